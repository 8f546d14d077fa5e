"""The three training-free test-time techniques (PAPER §6) and the baselines they are compared with.

* :mod:`.alrr` — ALRR: extra passes of a late block for tokens in the band τ < ‖x‖ < 1.5·τ (an Edit).
* :mod:`.erss` — ERSS: steer low-norm stretches towards the request's own earlier high-norm states (an Edit).
* :mod:`.lrs` — LRS: pick one of N sampled responses by its late-layer norm excess (a score over norm traces).
* :mod:`.confidence` — majority vote, DeepConf confidences, self-certainty, random pick: LRS's same-N baselines.

ALRR and ERSS are :class:`~tellnorm.interventions.edits.Edit` observers: they run inside
:func:`tellnorm.generation.generate` with per-request state and recorded decisions, like every intervention.

Thresholds. The reference code's per-decode trackers warm up for 500 (ALRR) / 200 (ERSS) decode steps, longer than
the organism's whole responses, so they would never fire there. tellnorm's default is ``calibrated``: one τ_l per
layer, Q3 + k·IQR of the norms of the model's own greedy responses to calibration prompts (validation problems
for the organism, never the test set). It fires on short and long responses alike and is the same for every
request. ``exact`` (per request, with a warm-up), ``pooled-p2`` (the reference code's pooled streaming
quartiles) and ``fixed`` (a JSON file) remain options.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from tellnorm.errors import TellnormError
from tellnorm.interventions.selection import AboveThreshold, is_number
from tellnorm.techniques.alrr import ALRR, ALRRConfig
from tellnorm.techniques.erss import ERSS, ERSSConfig
from tellnorm.techniques.lrs import LRSConfig
from tellnorm.thresholds import MODES, FixedThresholds, ThresholdConfig, calibrated_thresholds

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from tellnorm.backends.base import ModelAPI
    from tellnorm.interventions.edits import Edit

THRESHOLD_MODES = ("calibrated",) + MODES
EDIT_TECHNIQUES = ("alrr", "erss")  # decode-time edits; compose with "+" (applied in this order at a layer)
COMBINATIONS = ("alrr", "erss", "alrr+erss")


def parse_techniques(spec: str) -> tuple[str, ...]:
    """``"alrr+erss"`` → ("alrr", "erss"); one clear error for unknown or repeated names."""
    names = tuple(part.strip().lower() for part in spec.split("+"))
    for name in names:
        if name not in EDIT_TECHNIQUES:
            hint = " (LRS selects among sampled responses: use `tellnorm evaluate`)" if name == "lrs" else ""
            raise TellnormError(f"unknown decode-time technique {name!r}{hint}: choose from "
                                f"{', '.join(EDIT_TECHNIQUES)}, combined with '+'")
    if len(set(names)) != len(names):
        raise TellnormError(f"technique {spec!r} names one technique twice")
    return tuple(sorted(names, key=EDIT_TECHNIQUES.index))


def calibration_norms(model: ModelAPI, prompts: Sequence[Sequence[int]], layers: Sequence[int], *,
                      max_new_tokens: int, batch_size: int = 50, progress: bool = False) -> dict[int, np.ndarray]:
    """{layer: norms of every generated token} of the model's greedy responses to ``prompts``."""
    from tellnorm.generation import SamplingConfig, generate
    from tellnorm.norms import NormTracer, generated_rows

    tracer = NormTracer(model, layers)
    gens = generate(model, prompts, SamplingConfig(max_new_tokens=max_new_tokens), observers=[tracer],
                    batch_size=batch_size, progress=progress, desc="calibrating thresholds")
    generated = generated_rows(tracer.frame(), gens)
    return {int(layer): g.norm.to_numpy() for layer, g in generated.groupby("layer")}


def check_thresholds(thresholds: Mapping[int, float], layers: Sequence[int]) -> None:
    """One TellnormError unless every layer of ``layers`` has a finite threshold > 0 in ``thresholds``."""
    for layer in layers:
        value = thresholds.get(layer)
        if value is None:
            raise TellnormError(f"no threshold for layer {layer}: calibrate or give one for every target layer")
        if not (is_number(value) and math.isfinite(value) and value > 0):
            raise TellnormError(f"the threshold for layer {layer} is {value!r}: thresholds must be finite and > 0")


def threshold_for(mode: str, *, fixed: Mapping[int, float] | FixedThresholds | None = None,
                  cfg: ThresholdConfig | None = None) -> AboveThreshold:
    """The τ source of one technique: ``calibrated``/``fixed`` use ``fixed`` ({layer: τ}); ``exact`` and
    ``pooled-p2`` track norms during generation under ``cfg`` (k, IQR floor, warm-up)."""
    if mode not in THRESHOLD_MODES:
        raise TellnormError(f"unknown threshold mode {mode!r}: choose one of {', '.join(THRESHOLD_MODES)}")
    if mode in ("calibrated", "fixed"):
        if fixed is None:
            raise TellnormError(f"threshold mode {mode!r} needs per-layer thresholds")
        values = fixed.values if isinstance(fixed, FixedThresholds) else dict(fixed)
        check_thresholds(values, list(values))
        return AboveThreshold("fixed", fixed=fixed)
    return AboveThreshold(mode, cfg=cfg)


def build_edits(names: Sequence[str], model: ModelAPI, *, threshold_mode: str = "calibrated",
                fixed: Mapping[int, float] | FixedThresholds | None = None,
                threshold_cfg: ThresholdConfig | None = None, alrr: ALRRConfig | None = None,
                erss: ERSSConfig | None = None, requests: Iterable[Hashable] | None = None) -> list[Edit]:
    """Fresh edit objects for the techniques in ``names`` (one run; each has its own τ tracker)."""
    edits = []
    threshold_cfg = threshold_cfg or ThresholdConfig()
    for name in names:
        # each technique's own warm-up unless one was given (ERSS's reference code waits 200 steps, ALRR's 500)
        threshold = threshold_for(threshold_mode, fixed=fixed, cfg=threshold_cfg.for_technique(name))
        if name == "alrr":
            edits.append(ALRR(model, threshold, alrr, requests=requests))
        elif name == "erss":
            edits.append(ERSS(model, threshold, erss, requests=requests))
        else:
            raise TellnormError(f"unknown decode-time technique {name!r}: choose from {', '.join(EDIT_TECHNIQUES)}")
    return edits


def firing_report(edits: Sequence[ALRR | ERSS], request_ids: Sequence) -> pd.DataFrame:
    """Per request: what each technique did, summed over its layers (0 where it never acted)."""
    import pandas as pd

    out = pd.DataFrame({"request_id": pd.Series(list(request_ids), dtype=object)})
    for edit in edits:
        report = edit.report()
        sums = report.drop(columns="layer").groupby("request_id").sum()
        if edit.name != edit.kind:  # two edits of one kind keep their own columns
            sums.columns = [c.replace(f"{edit.kind}_", f"{edit.name}_", 1) for c in sums.columns]
        out = out.merge(sums, how="left", left_on="request_id", right_index=True)
    counters = [c for c in out.columns if c != "request_id"]
    out[counters] = out[counters].fillna(0).astype(int)
    return out


__all__ = [
    "ALRR",
    "COMBINATIONS",
    "EDIT_TECHNIQUES",
    "ERSS",
    "THRESHOLD_MODES",
    "ALRRConfig",
    "ERSSConfig",
    "LRSConfig",
    "build_edits",
    "calibrated_thresholds",
    "calibration_norms",
    "check_thresholds",
    "firing_report",
    "parse_techniques",
    "threshold_for",
]
