"""ALRR — Adaptive Layer-wise Reasoning Recursion (PAPER §6).

At a target layer l the block runs once as usual (that pass writes the KV cache). A token whose output norm is in
the band ``τ_l < ‖x‖ < BLOWUP·τ_l`` gets extra passes of the *same block* on its own output::

    h⁰ = x;   h^{k+1} = block_l(h^k | the cached keys/values of the earlier tokens)

An extra pass attends to the existing cache (positions before the token, plus its own new key/value) and never
writes it, so later tokens see exactly the keys/values of the first pass. A pass is kept only if the norm still
exceeds τ_l, grew by at least GROWTH_EPS and stays below BLOWUP·τ_l; the first rejected pass ends the recursion,
and at most ``max_extra_iters`` passes run. ``forced_loops=K`` is the paper's loop ablation: K passes, all kept.

The extra pass is HF's own decoder layer (weights shared with the model, TransformerLens hooks bypassed, so no
observer mistakes an extra pass for a token) called with a read-only view of the cache. Decisions are recorded per
(request, layer, position): a cache-free reference pass (``generate(..., reuse_cache=False)``) replays them.
"""

from __future__ import annotations

import inspect
import math
import time
import weakref
from collections.abc import Collection, Hashable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tellnorm.backends.fastpath import unwrap
from tellnorm.backends.hf import state_layers
from tellnorm.errors import TellnormError
from tellnorm.interventions.edits import Edit
from tellnorm.interventions.selection import AboveThreshold, Selection, is_number
from tellnorm.norms import l2_norm

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from tellnorm.backends.base import ModelAPI
    from tellnorm.generation import StepInfo

BLOWUP_RATIO = 1.5  # PAPER §6 / REFERENCE CODE: recurse only below 1.5·τ, keep only below it
GROWTH_EPS = 0.2  # PAPER §6 / REFERENCE CODE: a pass is kept only if the norm grew by ≥ 20%
MAX_EXTRA_ITERS = 1  # PAPER §6 / REFERENCE CODE: one extra pass (the demo uses 10)


@dataclass(frozen=True)
class ALRRConfig:
    """ALRR's settings (PAPER.md §6): target layers, the band's blow-up ratio, the growth a kept pass needs, the
    pass limit, and the forced-loop ablation. Checked when built."""

    layers: tuple[int, ...] | None = None  # REFERENCE CODE: the late layers (last quarter, final layer excluded)
    blowup_ratio: float = BLOWUP_RATIO  # PAPER §6: band τ < ‖x‖ < 1.5·τ
    growth_eps: float = GROWTH_EPS  # PAPER §6: keep a pass only if ‖h'‖ ≥ (1 + 0.2)·‖h‖
    max_extra_iters: int = MAX_EXTRA_ITERS  # PAPER §6: at most one extra pass
    forced_loops: int | None = None  # PAPER §6 ablation: exactly K passes per band token, all kept

    def __post_init__(self):
        if not (is_number(self.blowup_ratio) and math.isfinite(self.blowup_ratio) and self.blowup_ratio > 1):
            raise TellnormError(f"ALRR blowup_ratio must be a finite number > 1, got {self.blowup_ratio!r} "
                                "(the paper uses 1.5)")
        if not (is_number(self.growth_eps) and math.isfinite(self.growth_eps) and self.growth_eps >= 0):
            raise TellnormError(f"ALRR growth_eps must be a finite number ≥ 0, got {self.growth_eps!r} (paper: 0.2)")
        for name in ("max_extra_iters", "forced_loops"):
            value = getattr(self, name)
            if value is None and name == "forced_loops":
                continue
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise TellnormError(f"ALRR {name} must be a whole number ≥ 1, got {value!r}")


# ----------------------------------------------------------------------------------------- the block, unhooked

_RAW = weakref.WeakKeyDictionary()


def raw_parts(model: ModelAPI) -> tuple[list[torch.nn.Module], torch.nn.Module]:
    """``(decoder layers, rotary embedding)`` of the HF model without TransformerLens hooks (cached per model).

    Raises one TellnormError line for an architecture whose layers cannot re-run against the bridge's cache."""
    refusal = getattr(model, "info", {}).get("alrr_refusal")
    if refusal:
        arch = model.info.get("hf_architecture", model.architecture)
        raise TellnormError(f"ALRR's extra pass is not supported for {arch} because {refusal}")
    hf = model.hf_model
    if hf not in _RAW:
        inner = hf.model
        _RAW[hf] = ([unwrap(block) for block in inner.layers], unwrap(inner.rotary_emb))
    return _RAW[hf]


def _attention_kind(config, layer: int):
    """``(layer type, sliding window)`` of decoder layer ``layer`` as HF's model builds its masks: per-layer
    ``config.layer_types`` where the config has them (Gemma 2/3, gpt-oss, OLMo 3, Qwen2/3, SmolLM3), otherwise one
    ``config.sliding_window`` for every layer (Mistral, Phi-3, Qwen3-MoE); window None means full causal."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        kind = layer_types[layer]
        if kind not in ("full_attention", "sliding_attention"):
            raise TellnormError(f"ALRR's extra pass is not supported for layer {layer} because its attention is "
                                f"{kind!r} (only full and sliding-window attention are handled)")
        return kind, (config.sliding_window if kind == "sliding_attention" else None)
    return None, getattr(config, "sliding_window", None)


class _ReadOnlyPast:
    """What HF attention calls as ``past_key_values``: returns the earlier keys/values with the new ones appended,
    and writes nothing."""

    def __init__(self, keys, values):
        self.keys, self.values = keys, values

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        import torch

        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


def extra_block_pass(model: ModelAPI, layer: int, hidden: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                     info: StepInfo | None) -> torch.Tensor:
    """One extra pass of block ``layer`` (ALRR, PAPER.md §6) for the tokens at ``(rows, cols)`` (long ``[n]`` each)
    of the current forward pass.

    ``hidden`` ``[n, d_model]`` is each token's input to the extra pass. Token (r, c) attends to the cached
    keys/values of its request's real tokens before it, then to its own new key/value; the cache is not written.
    Returns ``[n, d_model]``."""
    import torch

    if info is not None and info.backend is not None:  # the backend re-runs its own layer (vLLM: paged cache)
        return info.backend.extra_block_pass(layer, hidden, rows, cols)
    if model.backend == "hf" and layer in state_layers(model.hf_model.config):
        return _state_layer_pass(model, layer, hidden, rows, cols, info)
    if info is None or info.cache is None:
        raise TellnormError("ALRR needs the KV cache of the forward pass: run it through tellnorm.generation.generate")
    blocks, rotary = raw_parts(model)  # first: refuses architectures it cannot run on
    cached = info.cache.layers[layer]
    keys, values = cached.keys, cached.values  # [batch, kv_heads, past + seq, head_dim]
    total, seq = keys.shape[-2], info.positions.shape[1]
    device = hidden.device
    rows, cols = rows.to(device), cols.to(device)
    attention = (info.attention_mask if info.attention_mask is not None
                 else torch.ones(keys.shape[0], total, dtype=torch.long, device=device)).to(device)
    if attention.shape[1] != total:
        raise TellnormError(f"ALRR's extra pass needs every cached column of layer {layer}, but its cache holds "
                            f"{total} of {attention.shape[1]} (a sliding-window cache?): run it through "
                            "tellnorm.generation.generate")
    layer_type, window = _attention_kind(model.hf_model.config, layer)
    column = (total - seq) + cols  # each token's own column in the cache
    index = torch.arange(total, device=device)[None, :]
    before = index < column[:, None]
    if window is not None:  # HF's sliding window: key column > query column - window (its own key is inside)
        before &= index > column[:, None] - window
    allowed = torch.cat([attention[rows].bool() & before, torch.ones_like(before[:, :1])], dim=1)
    mask = torch.zeros(allowed.shape, dtype=hidden.dtype, device=device)
    mask = mask.masked_fill(~allowed, torch.finfo(hidden.dtype).min)[:, None, None, :]
    positions = info.positions.to(device)[rows, cols][:, None]
    states = hidden[:, None, :]
    if "layer_type" in inspect.signature(rotary.forward).parameters:  # per-layer-type RoPE (Gemma 3, OLMo 3)
        embeddings = rotary(states, positions, layer_type)
    else:
        embeddings = rotary(states, positions)
    out = blocks[layer](states, attention_mask=mask, position_ids=positions,
                        past_key_values=_ReadOnlyPast(keys[rows], values[rows]), use_cache=False,
                        position_embeddings=embeddings)
    out = out[0] if isinstance(out, tuple) else out
    return out[:, 0, :]


def _state_layer_pass(model: ModelAPI, layer: int, hidden: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                      info: StepInfo | None) -> torch.Tensor:
    """The extra pass at a linear-attention (state) layer of a hybrid model, defined as for attention: the block
    re-applied to the token in its real context — reading the convolution/recurrent state its request's earlier
    tokens left, writing nothing. It runs HF's own block on a copy of that state: the state from before the pass
    (kept by the backend, ``StepInfo.layer_inputs``), advanced over the token's predecessors within the pass from
    their kept block inputs when there are any (prefill, teacher-forced and no-cache passes). Returns
    ``[n, d_model]``."""
    import torch

    from tellnorm.backends.hf import copy_state, state_cache

    kept = (info.layer_inputs or {}).get(layer) if info is not None else None
    if kept is None:
        raise TellnormError(f"ALRR's extra pass at linear-attention layer {layer} needs the block inputs the HF "
                            "backend keeps for an observer's extra_pass_layers: run it through "
                            "tellnorm.generation.generate or run_forward")
    inputs, before = kept  # [batch, seq, d_model], the layer's state before this pass (None: nothing before)
    block = raw_parts(model)[0][layer]
    device = hidden.device
    rows, cols = rows.to(device), cols.to(device)
    valid = info.valid.to(device)
    earlier = valid[rows] & (torch.arange(valid.shape[1], device=device)[None, :] < cols[:, None])  # [n, seq]
    out = torch.empty_like(hidden)

    def run(states: torch.Tensor, cache) -> torch.Tensor:  # the raw block on [n, t, d_model], updating ``cache``
        positions = torch.zeros(states.shape[:2], dtype=torch.long, device=device)  # a state layer has no RoPE
        result = block(states, attention_mask=None, position_ids=positions, past_key_values=cache, use_cache=True,
                       position_embeddings=None)
        return result[0] if isinstance(result, tuple) else result

    def cache_from(state_rows: torch.Tensor):
        return state_cache(model.hf_model, layer, None if before is None else copy_state(before, state_rows))

    first = ~earlier.any(dim=1)  # tokens with no predecessor in this pass read the state from before it
    if first.any():
        index = first.nonzero().flatten()
        out[index] = run(hidden[index][:, None, :], cache_from(rows[index]))[:, 0]
    for i in (~first).nonzero().flatten().tolist():  # predecessors inside the pass: advance a copy over them
        cache = cache_from(rows[i : i + 1])
        run(inputs[rows[i], earlier[i]][None], cache)
        out[i] = run(hidden[i][None, None, :], cache)[0, 0]
    return out


# ------------------------------------------------------------------------------------------------- the edit

class ALRR(Edit):
    """ALRR at ``cfg.layers`` (default: the model's late layers) for the tokens ``threshold`` finds above τ_l and
    below ``blowup_ratio``·τ_l (generated tokens by default).

    ``threshold`` is an :class:`~tellnorm.interventions.selection.AboveThreshold` (calibrated/fixed, exact per
    request, or pooled P²); ``selection`` replaces the band rule (e.g. a random matched control) while the keep
    rule still uses τ. Per request: :meth:`report` counts band tokens, extra passes and kept passes."""

    kind = "alrr"

    def __init__(self, model: ModelAPI, threshold: AboveThreshold, cfg: ALRRConfig | None = None, *,
                 selection: Selection | None = None, name: str | None = None,
                 requests: Iterable[Hashable] | None = None):
        self.cfg = cfg or ALRRConfig()
        if not isinstance(threshold, AboveThreshold):
            raise TellnormError("ALRR needs an AboveThreshold (the τ source): build one with "
                                "tellnorm.techniques.threshold_for(...)")
        if model.backend == "hf":
            raw_parts(model)  # an architecture whose layers cannot re-run is refused here, before any generation
        self.threshold = threshold
        self.band_rule = selection is None
        layers = list(self.cfg.layers) if self.cfg.layers is not None else model.late_layers()
        super().__init__(model, layers, selection=selection or threshold, name=name or self.kind,
                         requests=requests)
        if not self.band_rule:
            threshold.bind(self)
        self.extra_pass_calls = 0  # batched calls of extra_block_pass (each runs one pass for many tokens)
        self.extra_pass_seconds = 0.0  # wall time inside extra_block_pass (what the extra passes cost)
        self.extra_pass_cpu_seconds = 0.0  # the same in process CPU time (benchmarks on shared machines)

    @property
    def extra_pass_layers(self) -> list[int]:
        """The layers ALRR re-runs: a backend that drives its own blocks keeps their inputs (ExtraBlockPass)."""
        return self.layers

    def new_state(self, request_id: Hashable, layer: int) -> dict:
        """Per request and layer: the kept pass count per position (replayed by a cache-free reference pass) and
        the :meth:`report` counters."""
        return {"kept": {}, "band": 0, "extra_passes": 0, "kept_passes": 0}

    def release(self, request_ids: Collection[Hashable]) -> None:
        """As :meth:`Edit.release`, and the τ source's state too when a selection replaced the band rule."""
        super().release(request_ids)
        if not self.band_rule:
            self.threshold.release(request_ids)

    def select(self, layer: int, x: torch.Tensor, info: StepInfo, candidates: torch.Tensor) -> torch.Tensor:
        """The band tokens ``τ_l < ‖x‖ < blowup_ratio·τ_l`` (PAPER.md §6), or ``selection``'s choice when one was
        given (τ is recorded either way for the keep rule)."""
        if not self.band_rule:
            self.threshold.select(layer, x, info, candidates)  # records τ for the keep rule
            return self.selection.select(layer, x, info, candidates)
        above = self.threshold.select(layer, x, info, candidates)
        if not above.any():
            return above
        norms = l2_norm(x)
        tau = self.threshold.tau(layer, info, x).to(norms.device)
        return above & (norms < self.cfg.blowup_ratio * tau)

    def apply(self, layer: int, x: torch.Tensor, mask: torch.Tensor, info: StepInfo) -> torch.Tensor:
        """``x`` ``[batch, seq, d_model]`` with the tokens under ``mask`` replaced by their last kept extra pass of
        block ``layer`` (kept while the norm stays above τ, grows by ``growth_eps`` and stays below the blow-up;
        PAPER.md §6)."""
        import torch

        rows, cols = mask.nonzero(as_tuple=True)
        positions = info.positions.to(mask.device)[rows, cols].tolist()
        rids = [info.request_ids[r] for r in rows.tolist()]
        tau = self.threshold.tau(layer, info, x).to(x.device)[rows, cols]
        states = [self.state(rid, layer) for rid in rids]
        # Tokens decided before (a cache-free reference recomputing them) replay their kept pass count.
        replay = [st["kept"].get(p) for st, p in zip(states, positions)]
        h = x[rows, cols]
        passes = torch.zeros(len(rids), dtype=torch.long)
        going = torch.ones(len(rids), dtype=torch.bool)
        limit = self.cfg.forced_loops or self.cfg.max_extra_iters
        for i, n in enumerate(replay):
            if n is not None:
                going[i] = n > 0
        attempted = torch.zeros(len(rids), dtype=torch.long)
        for k in range(limit):
            index = going.nonzero().flatten()
            if len(index) == 0:
                break
            start, start_cpu = time.perf_counter(), time.process_time()
            new = extra_block_pass(self.model, layer, h[index], rows[index], cols[index], info)
            self.extra_pass_seconds += time.perf_counter() - start
            self.extra_pass_calls += 1
            self.extra_pass_cpu_seconds += time.process_time() - start_cpu
            attempted[index] += 1
            if self.cfg.forced_loops:
                accept = torch.ones(len(index), dtype=torch.bool)
            else:
                old_norm = l2_norm(h[index])
                new_norm = l2_norm(new)
                t = tau[index]
                accept = ((new_norm > t) & (new_norm >= (1 + self.cfg.growth_eps) * old_norm)
                          & (new_norm < self.cfg.blowup_ratio * t)).cpu()
            for j, i in enumerate(index.tolist()):
                if replay[i] is not None:
                    accept[j] = k < replay[i]
            kept_index = index[accept]
            h = h.clone()
            h[kept_index] = new[accept.to(new.device)].to(h.dtype)
            passes[kept_index] += 1
            going[:] = False
            going[kept_index] = True
            for i in kept_index.tolist():
                if replay[i] is not None and passes[i] >= replay[i]:
                    going[i] = False
        for i, (st, p) in enumerate(zip(states, positions)):
            if replay[i] is None:
                st["kept"][p] = int(passes[i])
                st["band"] += 1
                st["extra_passes"] += int(attempted[i])
                st["kept_passes"] += int(passes[i])
        out = x.clone()
        out[rows, cols] = h.to(x.dtype)
        return out

    def report(self) -> pd.DataFrame:
        """One row per (request, layer) this edit saw: band tokens, extra block passes run, passes kept."""
        import pandas as pd

        rows = [{"request_id": rid, "layer": layer, "alrr_band_tokens": st["band"],
                 "alrr_extra_passes": st["extra_passes"], "alrr_kept_passes": st["kept_passes"]}
                for (rid, layer), st in self._states.items()]
        return pd.DataFrame(rows, columns=["request_id", "layer", "alrr_band_tokens", "alrr_extra_passes",
                                           "alrr_kept_passes"])
