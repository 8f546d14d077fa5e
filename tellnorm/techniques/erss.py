"""ERSS — Endogenous Reasoning State Steering (PAPER §6).

Per request and target layer, a bank keeps the ``bank_k`` highest-norm earlier states with ‖x‖ > τ_l. When the
last ``low_k`` tokens were all below ``gamma``·τ_l, no cooldown is running and a seeded draw is below
``p_inject``, the bank state v* with the highest cosine to the current state x is chosen (cos ≥ ``cos_min``) and

    x ← x + β·(v* − x)                                     β = 0.5: halfway towards v*

followed by ``cooldown`` tokens without injections. The bank and counters belong to the request (the reference
code keys them by batch slot, where a reused slot inherits another request's states). The streak counts the
tokens' own (pre-injection) norms and is not reset by an injection: the trigger reads "the last ``low_k`` tokens
were low", the cooldown spaces injections. Draws are ``token_uniforms(seed, request, layer, position)``, so a
request does the same alone and in any batch.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tellnorm.errors import TellnormError
from tellnorm.interventions.edits import Edit
from tellnorm.interventions.selection import AboveThreshold, is_number, token_uniforms
from tellnorm.norms import l2_norm

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from tellnorm.backends.base import ModelAPI
    from tellnorm.generation import StepInfo


@dataclass(frozen=True)
class ERSSConfig:
    """ERSS's settings (PAPER.md §6): target layers, bank size, trigger streak and level, injection chance, cosine
    floor, step β, cooldown and the draws' seed. Checked when built."""

    layers: tuple[int, ...] | None = None  # REFERENCE CODE: the late layers (last quarter, final layer excluded)
    bank_k: int = 32  # REFERENCE CODE: BANK_K, the bank keeps the 32 highest-norm states
    low_k: int = 40  # REFERENCE CODE: LOW_K, a streak of 40 low-norm tokens triggers
    gamma: float = 1.0  # REFERENCE CODE: GAMMA, "low" = norm below GAMMA·τ
    p_inject: float = 0.2  # REFERENCE CODE: P_INJECT, chance of injecting once triggered
    cos_min: float = 0.5  # REFERENCE CODE: COS_MIN, the chosen bank state needs cosine ≥ 0.5
    beta: float = 0.5  # REFERENCE CODE: BETA, x ← x + 0.5·(v* − x)
    cooldown: int = 32  # REFERENCE CODE: COOLDOWN, tokens without injection after one
    seed: int = 0  # TELLNORM: the draws' seed (per request, layer and position)

    def __post_init__(self):
        for name in ("bank_k", "low_k"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise TellnormError(f"ERSS {name} must be a whole number ≥ 1, got {value!r}")
        if not (isinstance(self.cooldown, int) and not isinstance(self.cooldown, bool) and self.cooldown >= 0):
            raise TellnormError(f"ERSS cooldown must be a whole number ≥ 0, got {self.cooldown!r}")
        for name, low, high in (("gamma", 0, math.inf), ("p_inject", 0, 1), ("cos_min", -1, 1), ("beta", 0, 1)):
            value = getattr(self, name)
            if not (is_number(value) and math.isfinite(value) and low <= value <= high
                    and (name != "gamma" or value > 0)):
                interval = "> 0" if name == "gamma" else f"in [{low}, {high}]"
                raise TellnormError(f"ERSS {name} must be a finite number {interval}, got {value!r}")


class ERSS(Edit):
    """ERSS at ``cfg.layers`` (default: the late layers) on generated tokens, τ from ``threshold``.
    :meth:`report` counts, per request, bank additions, triggers and injections."""

    kind = "erss"

    def __init__(self, model: ModelAPI, threshold: AboveThreshold, cfg: ERSSConfig | None = None, *,
                 name: str | None = None, requests: Iterable[Hashable] | None = None):
        self.cfg = cfg or ERSSConfig()
        if not isinstance(threshold, AboveThreshold):
            raise TellnormError("ERSS needs an AboveThreshold (the τ source): build one with "
                                "tellnorm.techniques.threshold_for(...)")
        self.threshold = threshold
        layers = list(self.cfg.layers) if self.cfg.layers is not None else model.late_layers()
        super().__init__(model, layers, selection=threshold, name=name or self.kind, requests=requests)

    def new_state(self, request_id: Hashable, layer: int) -> dict:
        """Per request and layer: the bank, streak and cooldown counters, the injection targets, and the
        :meth:`report` counters."""
        # bank: [(norm, state)] highest norms first; targets: position -> the state injected there
        return {"bank": [], "streak": 0, "cooldown": 0, "targets": {}, "banked": 0, "triggers": 0,
                "injections": 0}

    def settled_state(self, state: dict) -> dict:
        """A finished request keeps its :meth:`report` counters and the states it injected; its bank goes."""
        return {**state, "bank": []}

    def select(self, layer: int, x: torch.Tensor, info: StepInfo, candidates: torch.Tensor) -> torch.Tensor:
        """Bank the peaks and return the tokens where an injection fires (streak of low norms, no cooldown, a bank
        state with cosine ≥ ``cos_min``, a draw < ``p_inject``; PAPER.md §6), remembering each one's target."""
        import torch

        peaks = self.threshold.select(layer, x, info, candidates)  # also records the τ each token met
        scope = self.threshold.scope.select(layer, x, info, candidates)
        out = torch.zeros_like(candidates)
        if not scope.any():
            return out
        rows, cols = scope.nonzero(as_tuple=True)  # row-major: position order within each request
        norms = l2_norm(x)[rows, cols].tolist()
        taus = self.threshold.tau(layer, info, x)[rows.cpu(), cols.cpu()].tolist()
        is_peak = peaks[rows, cols].tolist()
        positions = info.positions.to(rows.device)[rows, cols].tolist()
        cfg = self.cfg
        for row, col, norm, t, peak, position in zip(rows.tolist(), cols.tolist(), norms, taus, is_peak, positions):
            rid = info.request_ids[row]
            st = self.state(rid, layer)
            cooling = st["cooldown"] > 0  # this token is one of the `cooldown` after an injection
            if cooling:
                st["cooldown"] -= 1
            if not math.isfinite(t):  # no τ yet (warm-up): nothing is high or low
                st["streak"] = 0
                continue
            if peak:
                st["streak"] = 0
                st["bank"].append((norm, x[row, col].detach().clone()))
                st["bank"].sort(key=lambda item: -item[0])
                del st["bank"][cfg.bank_k:]
                st["banked"] += 1
                continue
            st["streak"] = st["streak"] + 1 if norm < cfg.gamma * t else 0
            if st["streak"] < cfg.low_k or cooling or not st["bank"]:
                continue
            st["triggers"] += 1
            if token_uniforms(cfg.seed, rid, layer, [position])[0] >= cfg.p_inject:
                continue
            bank = torch.stack([state for _, state in st["bank"]]).float()
            cos = torch.nn.functional.cosine_similarity(bank, x[row, col].float()[None, :], dim=-1)
            best = int(cos.argmax())
            if float(cos[best]) < cfg.cos_min:
                continue
            st["targets"][position] = st["bank"][best][1]
            st["injections"] += 1
            st["cooldown"] = cfg.cooldown
            out[row, col] = True
        return out

    def apply(self, layer: int, x: torch.Tensor, mask: torch.Tensor, info: StepInfo) -> torch.Tensor:
        """``x + β·(v* − x)`` on the tokens under ``mask`` (v* the target chosen in :meth:`select`), ``x`` elsewhere."""
        out = x.clone()
        for row, col in mask.nonzero().tolist():
            target = self.state(info.request_ids[row], layer)["targets"][int(info.positions[row, col])]
            out[row, col] = x[row, col] + self.cfg.beta * (target.to(x.dtype) - x[row, col])
        return out

    def report(self) -> pd.DataFrame:
        """One row per (request, layer): states banked, triggers (streak, no cooldown, bank), injections."""
        import pandas as pd

        rows = [{"request_id": rid, "layer": layer, "erss_banked": st["banked"], "erss_triggers": st["triggers"],
                 "erss_injections": st["injections"]} for (rid, layer), st in self._states.items()]
        return pd.DataFrame(rows, columns=["request_id", "layer", "erss_banked", "erss_triggers", "erss_injections"])
