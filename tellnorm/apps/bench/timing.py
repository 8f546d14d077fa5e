"""What the three benchmarks share: one timed call, round orders, ratio statistics, machine info and the outputs.

Every benchmark times a call as ``timeit`` does: ``gc.collect()`` first, the garbage collector off during the call
(restored after), ``perf_counter`` for wall time and ``process_time`` for the CPU time of every thread of the
process. Rounds are interleaved, round ``r`` starting at variant ``r mod len(variants)``.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tellnorm.errors import TellnormError


@dataclass
class Timed:
    """One timed call: wall seconds (``perf_counter``), process CPU seconds (``process_time``) and its result."""

    wall_s: float
    cpu_s: float
    result: Any


def timed(fn: Callable[..., Any], *args: Any) -> Timed:
    """Call ``fn(*args)`` once after ``gc.collect()``, with the garbage collector off during the call."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        start, start_cpu = time.perf_counter(), time.process_time()
        result = fn(*args)
        wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    finally:
        if enabled:
            gc.enable()
    return Timed(wall, cpu, result)


def round_order(variants: Sequence[str], r: int) -> tuple[str, ...]:
    """The variants in round ``r``'s order: starting at variant ``r mod len(variants)``, wrapping around."""
    variants = tuple(variants)
    k = r % len(variants)
    return variants[k:] + variants[:k]


def quartiles(values: list[float]) -> tuple[float, float]:
    """``(Q1, Q3)`` of ``values`` (inclusive method); the value itself twice when there is one."""
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def ratio_stats(values: list[float], *, with_quartiles: bool = False) -> dict:
    """``{median, [q1, q3,] min, max}`` of per-round ratios."""
    out = {"median": statistics.median(values)}
    if with_quartiles:
        out["q1"], out["q3"] = quartiles(values)
    out.update({"min": min(values), "max": max(values)})
    return out


def config_dict(cfg: Any) -> dict:
    """A benchmark config dataclass as a JSON-ready dict (paths as strings)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}


def model_info(model: Any) -> dict:
    """Parameter count, dtype, attention implementation and device of a model on the HF backend."""
    hf_cfg = model.hf_model.config
    return {"parameters": sum(p.numel() for p in model.hf_model.parameters()),
            "dtype": str(next(model.hf_model.parameters()).dtype).replace("torch.", ""),
            "attn_implementation": getattr(hf_cfg, "_attn_implementation", None),
            "device": str(model.device)}


def load_average() -> float | None:
    """The 1-minute load average, None where the platform has none."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def bench_machine(threads: int | None, device: str = "cpu") -> dict:
    """Set torch's threads (None keeps torch's setting), check that a CUDA ``device`` exists, and return
    :func:`machine_info`: what every benchmark does before it builds a model."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TellnormError("--device cuda: this machine has no CUDA device (use --device cpu)")
    return machine_info(threads)


def machine_info(threads_set: int | None) -> dict:
    """CPU counts, torch threads, library versions and platform, and the load average at the start."""
    import torch
    import transformers

    try:
        from importlib.metadata import version

        tl_version = version("transformer-lens")
    except Exception:  # pragma: no cover - metadata missing in odd installs
        tl_version = None
    info = {
        "cpu_count": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "threads_set": threads_set,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "transformer_lens_version": tl_version,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
    }
    if hasattr(os, "getloadavg"):
        info["load_average_1m_start"] = load_average()
    return info


def table_lines(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A plain-text table: first column left-aligned, the others right-aligned, a rule under the header."""
    rows = [tuple(header)] + [tuple(r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def write_results(summary: dict, stem: Path, frame: Any, table: str) -> None:
    """A benchmark's JSON summary and CSV table (``stem.json``, ``stem.csv``), and its table printed."""
    from tellnorm.io import write_csv, write_json

    write_json(summary, stem.with_suffix(".json"))
    write_csv(frame, stem.with_suffix(".csv"))
    print(table)
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.csv')}")
