"""Composable residual-stream edits: observers that change the stream at a hook point, per request.

An :class:`Edit` is a :class:`~tellnorm.generation.LayerHooks` observer, so it runs inside
:func:`~tellnorm.generation.generate` (KV-cached, left-padded batches) and :func:`~tellnorm.generation.run_forward`
(teacher-forced) exactly like norm tracing, with its hooks removed on every exit path. At each hook call it

1. takes the candidates: real tokens (not padding) of its requests whose decision is not yet recorded;
2. ``select(layer, x, info, candidates)`` → which of them to edit (a :class:`~.selection.Selection`);
3. ``apply(layer, x, mask, info)`` → the new stream (a new tensor: the input is never modified in place, so an
   edit at layer L cannot change what an earlier hook saw);
4. records every decision per (request, layer, position) in :attr:`Edit.record`.

A token's decision is made once and kept: when a pass recomputes a prefix (a no-cache reference, or a technique
that re-runs tokens) the recorded decision is reused, so stateful selections never see a token twice. One edit
object serves one run; :meth:`Edit.reset` (or a fresh object) starts another.

The kinds (x is the stream at the hook of one selected token, W_dec[i] SAE decoder rows):

* :class:`Scale` — ``x' = c·x`` (c > 0; c < 1 suppresses, c > 1 amplifies; c = 1 is the identity bit for bit).
* :class:`ClampNorm` — ``x' = x·min(1, m/‖x‖₂)``: the norm capped at m, the direction kept (m per layer, or a
  function of the token, e.g. ¼ of the τ its threshold used: PAPER §4's alternative).
* :class:`AddVector` — ``x' = x + s·v_l`` (steering).
* :class:`SAEFeatureEdit` — ``x' = x + Σ_{i∈F} (a'_i − a_i)·W_dec[i]`` with ``a = sae.encode(x)``: the SAE's
  reconstruction error stays in the stream, so exactly feature i's decoded contribution changes; ``a' = a`` adds an
  exact zero. ``a'`` is a constant (clamp; 0 = ablate) or a function of ``a`` (e.g. ``2·a``).

Edits compose: pass several to one run; at a shared hook point they apply in the order given, and across layers
in forward order. Inputs are validated when an edit is built, so a bad factor, fraction, layer, feature or vector
fails with one TellnormError before any generation starts.

Extending: a technique is an Edit whose ``select``/``apply`` keep per-request state via :meth:`Edit.state`
(ERSS: a bank of high-norm states per request; ALRR: re-run the block on the selected rows).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import TYPE_CHECKING, Any

from tellnorm.errors import TellnormError
from tellnorm.features import check_features
from tellnorm.generation import Generation, LayerHooks, StepInfo
from tellnorm.interventions.selection import All, Selection, is_number
from tellnorm.norms import l2_norm

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    import torch
    from sae_lens import SAE

    from tellnorm.backends.base import ModelAPI


@dataclass
class EditRecord:
    """Every decision an edit made: per (request, layer), one bool per position from ``start`` on."""

    name: str
    decisions: dict = field(default_factory=dict)  # (request_id, layer) -> list[bool], position = start + index
    start: dict = field(default_factory=dict)  # (request_id, layer) -> first decided position
    n_prompt: dict = field(default_factory=dict)  # request_id -> prompt length (when the pass said)

    def requests(self) -> set:
        """Every request with a recorded decision."""
        return {rid for rid, _ in self.decisions}

    def decided(self, request_id: Hashable, layer: int) -> int:
        """One past the last decided position (0 when none)."""
        key = (request_id, layer)
        return self.start.get(key, 0) + len(self.decisions.get(key, ()))

    def take(self, request_ids: Collection[Hashable] | None = None) -> EditRecord:
        """Remove and return the decisions of ``request_ids`` (None: all) as a record of their own."""
        taken = EditRecord(self.name)
        keys = [key for key in self.decisions if request_ids is None or key[0] in request_ids]
        for key in keys:
            taken.decisions[key], taken.start[key] = self.decisions.pop(key), self.start.pop(key)
        for rid in [rid for rid in self.n_prompt if request_ids is None or rid in request_ids]:
            taken.n_prompt[rid] = self.n_prompt.pop(rid)
        return taken

    def add(self, part: EditRecord) -> None:
        """Put back the decisions :meth:`take` removed (of requests this record does not hold)."""
        clash = part.decisions.keys() & self.decisions.keys()
        if clash:
            raise TellnormError(f"edit {self.name!r}: request {next(iter(clash))[0]!r} was recorded twice")
        self.decisions.update(part.decisions)
        self.start.update(part.start)
        self.n_prompt.update(part.n_prompt)

    def frame(self) -> pd.DataFrame:
        """One row per decided token: edit, request_id, layer, position, edited, is_generated."""
        import numpy as np
        import pandas as pd

        parts = []
        for (rid, layer), flags in self.decisions.items():
            start = self.start[(rid, layer)]
            positions = np.arange(start, start + len(flags), dtype=np.int64)
            n_prompt = self.n_prompt.get(rid)
            parts.append(pd.DataFrame({
                "request_id": pd.Series([rid] * len(flags), dtype=object), "layer": np.int16(layer),
                "position": positions, "edited": np.asarray(flags, dtype=bool),
                "is_generated": positions >= n_prompt if n_prompt is not None else np.zeros(len(flags), bool)}))
        columns = ["edit", "request_id", "layer", "position", "edited", "is_generated"]
        if not parts:
            return pd.DataFrame(columns=columns)
        return pd.concat(parts, ignore_index=True).assign(edit=self.name)[columns]

    def summary(self) -> pd.DataFrame:
        """Per (request, layer): tokens decided, generated tokens, edited tokens, and the edited fractions."""
        f = self.frame()
        f = f.assign(edited_generated=f.edited & f.is_generated)
        out = f.groupby(["request_id", "layer"], sort=True).agg(
            n_tokens=("edited", "size"), n_generated=("is_generated", "sum"), n_edited=("edited", "sum"),
            n_edited_generated=("edited_generated", "sum")).reset_index()
        out["fraction_edited"] = out.n_edited / out.n_tokens
        out["fraction_generated_edited"] = out.n_edited_generated / out.n_generated.where(out.n_generated > 0)
        return out.assign(edit=self.name)


class Edit(LayerHooks):
    """An observer that edits the stream at ``point`` of each layer in ``layers`` for the tokens ``selection``
    picks (default: all) of the requests in ``requests`` (default: every request).

    Subclasses implement ``apply(layer, x, mask, info) -> x'`` (mask ``[batch, seq]`` bool) and may override
    ``select``. Per-request state lives in ``self.state(request_id, layer)`` (built by ``new_state``)."""

    kind = "edit"

    def __init__(self, model: ModelAPI, layers: Iterable[int], *, selection: Selection | None = None,
                 point: str = "resid_post", requests: Iterable | None = None, name: str | None = None):
        layers = list(layers)
        if not layers:
            raise TellnormError(f"{type(self).__name__} needs at least one layer")
        if len(set(layers)) != len(layers):
            raise TellnormError(f"{type(self).__name__} names a layer twice: {layers}")
        super().__init__(model, layers, point)  # validates every layer and the hook point
        self.selection = selection if selection is not None else All()
        if not isinstance(self.selection, Selection):
            raise TellnormError(f"selection must be a tellnorm Selection, got {type(self.selection).__name__}")
        self.selection.bind(self)
        self.requests = None if requests is None else set(requests)
        self.name = name or self.kind
        self.record = EditRecord(self.name)
        self._states: dict = {}

    # -- the protocol ------------------------------------------------------------------------------------------
    def select(self, layer: int, x: torch.Tensor, info: StepInfo, candidates: torch.Tensor) -> torch.Tensor:
        """Which ``candidates`` (bool ``[batch, seq]``) to edit, given the stream ``x`` ``[batch, seq, d_model]``:
        the selection's choice unless a subclass decides itself."""
        return self.selection.select(layer, x, info, candidates)

    def apply(self, layer: int, x: torch.Tensor, mask: torch.Tensor, info: StepInfo) -> torch.Tensor:
        """The new stream ``[batch, seq, d_model]`` with the tokens under ``mask`` (bool ``[batch, seq]``) edited, as a
        new tensor; each subclass implements it."""
        raise NotImplementedError

    def new_state(self, request_id: Hashable, layer: int) -> dict:
        """Per-request state of a technique (ERSS's bank, a streak counter); plain edits keep none."""
        return {}

    def state(self, request_id: Hashable, layer: int) -> dict:
        """The state of ``request_id`` at ``layer``, built by :meth:`new_state` on first use."""
        key = (request_id, layer)
        if key not in self._states:
            self._states[key] = self.new_state(request_id, layer)
        return self._states[key]

    def check_new_requests(self, request_ids: Iterable[Hashable]) -> None:
        """Before a run: one TellnormError line if this edit already decided any of ``request_ids`` (one edit object
        serves one run; on vLLM a step can mix new and old requests, so the check cannot wait for a prefill)."""
        again = self.record.requests() & set(request_ids)
        if again:
            raise TellnormError(f"edit {self.name!r} already edited request {sorted(again, key=str)[0]!r}: one edit "
                                "object serves one run; build a new one (or call reset()) to generate it again")

    def pools_requests(self) -> bool:
        """Whether a decision depends on the other requests of its step (the selection's, or a technique's τ)."""
        threshold = getattr(self, "threshold", None)
        return self.selection.pools_requests() or bool(threshold is not None and threshold.pools_requests())

    def settled_state(self, state: dict) -> dict:
        """What a finished request's state keeps (:meth:`release`): by default all of it; a technique drops what
        only its next decisions read (ERSS's bank of states) and keeps what it reports."""
        return state

    def release(self, request_ids: Collection[Hashable]) -> None:
        """Forget the working state of finished ``request_ids`` (:class:`~tellnorm.generation.FinishedRequests`);
        decisions and report counters stay."""
        for key in [key for key in self._states if key[0] in request_ids]:
            self._states[key] = self.settled_state(self._states[key])
        self.selection.release(request_ids)

    def take_records(self, request_ids: Collection[Hashable] | None = None) -> dict:
        """Remove and return the decisions and (settled) states of ``request_ids`` (None: of every request)."""
        keys = [key for key in self._states if request_ids is None or key[0] in request_ids]
        return {"record": self.record.take(request_ids), "states": {key: self._states.pop(key) for key in keys}}

    def add_records(self, part: dict) -> None:
        """Put back a part :meth:`take_records` returned (on this edit's copy in another process)."""
        self.record.add(part["record"])
        self._states.update(part["states"])

    def reset(self) -> None:
        """Forget every request (records, selection state, per-request state): the edit can serve a new run."""
        self.record = EditRecord(self.name)
        self.selection.reset()
        self._states = {}
        self.info = None

    # -- the hook ------------------------------------------------------------------------------------------------
    def hook_for(self, layer: int) -> Callable[..., Any]:
        """The hook at ``layer``: decides the new tokens of ``x`` ``[batch, seq, d_model]``, replays recorded
        decisions, and returns :meth:`apply`'s stream (``x`` itself when nothing is selected)."""
        def hook(x, hook):
            info = self.info or StepInfo.default(*x.shape[:2])
            rows = [r for r, rid in enumerate(info.request_ids) if self.requests is None or rid in self.requests]
            if not rows:
                return x
            mask = self._decide(layer, x, info, rows)
            if not mask.any():
                return x
            return self.apply(layer, x, mask.to(x.device), info)

        return hook

    def _decide(self, layer: int, x, info: StepInfo, rows: list[int]):
        """The selected tokens of this pass: recorded decisions for tokens seen before, ``select`` for new ones."""
        import torch

        record = self.record
        batch, seq = x.shape[:2]
        positions, valid = info.positions.cpu(), info.valid.cpu()
        decided, active = [0] * batch, [False] * batch
        for r in rows:
            rid = info.request_ids[r]
            decided[r] = record.decided(rid, layer)
            if info.phase == "prefill" and decided[r]:
                raise TellnormError(f"edit {self.name!r} already edited request {rid!r}: one edit object serves one "
                                    "run; build a new one (or call reset()) to generate that request again")
            active[r] = True
            if info.n_prompt is not None:
                record.n_prompt[rid] = info.n_prompt[r]
        real = valid & torch.tensor(active)[:, None]
        new = real & (positions >= torch.tensor(decided)[:, None])
        mask = torch.zeros(batch, seq, dtype=torch.bool)
        if new.any():
            mask = (self.select(layer, x, info, new.to(x.device)).cpu() & new)
            # Python lists, not per-row tensor ops: this runs at every hook call of every decode step.
            new_rows, mask_rows, position_rows = new.tolist(), mask.tolist(), positions.tolist()
            for r in rows:
                cols = [c for c, is_new in enumerate(new_rows[r]) if is_new]
                if not cols:
                    continue
                key = (info.request_ids[r], layer)
                pos = [position_rows[r][c] for c in cols]
                if key not in record.decisions:
                    record.start[key], record.decisions[key] = pos[0], []
                elif pos[0] != record.decided(*key) or any(b - a != 1 for a, b in pairwise(pos)):
                    raise TellnormError(f"edit {self.name!r}: request {key[0]!r} skipped positions at layer {layer} "
                                        "(a pass must continue where the previous one ended)")
                record.decisions[key].extend(mask_rows[r][c] for c in cols)
        old = real & ~new
        if old.any():
            for r in old.any(-1).nonzero().flatten().tolist():
                key = (info.request_ids[r], layer)
                cols = old[r].nonzero().flatten()
                start, flags = record.start.get(key, 0), record.decisions.get(key, [])
                index = positions[r, cols] - start
                inside = (index >= 0) & (index < len(flags))
                if inside.any():
                    mask[r, cols[inside]] = torch.tensor(flags, dtype=torch.bool)[index[inside]]
        return mask


def replace_rows(x: torch.Tensor, mask: torch.Tensor, new_rows: torch.Tensor) -> torch.Tensor:
    """``x`` ``[batch, seq, d_model]`` with the tokens under ``mask`` (bool ``[batch, seq]``) replaced by
    ``new_rows`` ``[n_selected, d_model]`` (a new tensor; ``x`` is untouched)."""
    out = x.clone()
    out[mask] = new_rows.to(x.dtype)
    return out


def check_factor(factor: Any, what: str = "scale factor") -> float:
    """``factor`` as a float when it is a finite number > 0, or one TellnormError naming ``what``."""
    if not (is_number(factor) and math.isfinite(factor) and factor > 0):
        raise TellnormError(f"{what} must be a finite number > 0, got {factor!r} (0.1 suppresses as in the paper, "
                            "2 amplifies)")
    return float(factor)


class Scale(Edit):
    """``x' = factor·x`` on the selected tokens (PAPER §4: factor 0.1 on high-norm tokens)."""

    kind = "scale"

    def __init__(self, model: ModelAPI, layers: Iterable[int], factor: float, **kwargs: Any):
        self.factor = check_factor(factor)
        super().__init__(model, layers, **kwargs)

    def apply(self, layer: int, x: torch.Tensor, mask: torch.Tensor, info: StepInfo) -> torch.Tensor:
        """``factor·x`` on the tokens under ``mask``, ``x`` elsewhere (``[batch, seq, d_model]``)."""
        return x.where(~mask[..., None], x * self.factor)


NormTarget = float | Mapping[int, float] | Callable[[int, StepInfo, Any], Any]


class ClampNorm(Edit):
    """``x' = x·min(1, m/‖x‖₂)``: the norm capped at ``max_norm``, direction kept.

    ``max_norm``: one number, ``{layer: number}``, or ``f(layer, info, x) -> [batch, seq] tensor`` (e.g.
    :func:`tau_fraction` for ¼ of the threshold each token was tested against)."""

    kind = "clamp"

    def __init__(self, model: ModelAPI, layers: Iterable[int], max_norm: NormTarget, **kwargs: Any):
        layers = list(layers)
        if isinstance(max_norm, Mapping):
            missing = [layer for layer in layers if layer not in max_norm]
            if missing:
                raise TellnormError(f"clamp has no target norm for layer(s) {missing}")
            self.max_norm = {layer: check_factor(max_norm[layer], f"clamp target at layer {layer}") for layer in layers}
        elif callable(max_norm):
            self.max_norm = max_norm
        else:
            self.max_norm = check_factor(max_norm, "clamp target norm")
        super().__init__(model, layers, **kwargs)

    def apply(self, layer: int, x: torch.Tensor, mask: torch.Tensor, info: StepInfo) -> torch.Tensor:
        """``x·min(1, m/‖x‖₂)`` on the tokens under ``mask`` (a NaN target leaves a token alone), ``x`` elsewhere."""
        norms = l2_norm(x, keepdim=True)
        if callable(self.max_norm):
            target = self.max_norm(layer, info, x)[..., None].to(norms.device)
        else:
            target = self.max_norm[layer] if isinstance(self.max_norm, dict) else self.max_norm
        ratio = (target / norms).clamp(max=1.0).nan_to_num(1.0)  # NaN targets (no τ yet) leave the token alone
        return x.where(~mask[..., None], x * ratio.to(x.dtype))


def tau_fraction(selection: Selection, fraction: float) -> Callable[[int, StepInfo, torch.Tensor], torch.Tensor]:
    """A ClampNorm target: ``fraction`` × the τ each token was tested against by ``selection`` (an AboveThreshold,
    alone or inside ``&``). PAPER §4: clamp to τ/4."""
    from tellnorm.interventions.selection import AboveThreshold, AllOf

    fraction = check_factor(fraction, "clamp fraction of tau")
    parts = selection.parts if isinstance(selection, AllOf) else [selection]
    thresholds = [p for p in parts if isinstance(p, AboveThreshold)]
    if not thresholds:
        raise TellnormError("clamping relative to tau needs an above-threshold selection to take tau from")

    def target(layer, info, x):
        return fraction * thresholds[0].tau(layer, info, x)

    return target


def check_vector(vector: Any, d_model: int, what: str = "steering vector") -> torch.Tensor:
    """A float tensor of shape [d_model] with finite values, or one clear TellnormError."""
    import numpy as np
    import torch

    if isinstance(vector, np.ndarray):
        vector = torch.from_numpy(vector)
    if not isinstance(vector, torch.Tensor):
        raise TellnormError(f"{what} must be a torch tensor or numpy array, got {type(vector).__name__}")
    if not vector.is_floating_point():
        raise TellnormError(f"{what} has dtype {vector.dtype}: it must be a floating-point tensor (float32/float64)")
    if tuple(vector.shape) != (d_model,):
        raise TellnormError(f"{what} has shape {tuple(vector.shape)} but the model's residual stream has size "
                            f"{d_model}: give one value per dimension, shape ({d_model},)")
    if not torch.isfinite(vector).all():
        raise TellnormError(f"{what} contains NaN or inf")
    return vector.detach()


class AddVector(Edit):
    """``x' = x + scale·v_l`` (steering); ``vectors`` is one [d_model] tensor for every layer or ``{layer: v}``."""

    kind = "add"

    def __init__(self, model: ModelAPI, layers: Iterable[int],
                 vectors: torch.Tensor | np.ndarray | Mapping[int, torch.Tensor | np.ndarray], *, scale: float = 1.0,
                 **kwargs: Any):
        layers = list(layers)
        if not (is_number(scale) and math.isfinite(scale)):
            raise TellnormError(f"steering scale must be a finite number, got {scale!r}")
        if isinstance(vectors, Mapping):
            missing = [layer for layer in layers if layer not in vectors]
            if missing:
                raise TellnormError(f"steering has no vector for layer(s) {missing}")
            self.vectors = {layer: check_vector(vectors[layer], model.d_model, f"steering vector at layer {layer}")
                            for layer in layers}
        else:
            vector = check_vector(vectors, model.d_model)
            self.vectors = {layer: vector for layer in layers}
        self.scale = float(scale)
        super().__init__(model, layers, **kwargs)

    def apply(self, layer: int, x: torch.Tensor, mask: torch.Tensor, info: StepInfo) -> torch.Tensor:
        """``x + scale·v_l`` on the tokens under ``mask``, ``x`` elsewhere (``[batch, seq, d_model]``)."""
        shift = (self.scale * self.vectors[layer]).to(device=x.device, dtype=x.dtype)
        return x.where(~mask[..., None], x + shift)


def check_sae_for_edit(sae: SAE, model: ModelAPI, layer: int, point: str) -> None:
    """The SAE must read this hook and decode linearly (no run-time normalisation) for the error-term edit."""
    from tellnorm.saes import validate_sae

    validate_sae(sae, model, layer)
    hooks = model.bridge.hook_dict
    if hooks.get(sae.cfg.metadata.hook_name) is not hooks.get(model.hook_name(layer, point)):
        raise TellnormError(f"the layer-{layer} SAE reads {sae.cfg.metadata.hook_name!r} but the edit is at "
                            f"{model.hook_name(layer, point)!r}: edit the point the SAE was trained on")
    norm = getattr(sae.cfg, "normalize_activations", "none")
    if norm not in ("none", "expected_average_only_in"):
        raise TellnormError(f"the layer-{layer} SAE normalises its input at run time ({norm!r}), so its decoder "
                            "rows are not directions of the residual stream: fold the normalisation first")


class SAEFeatureEdit(Edit):
    """Set SAE features to ``value`` and keep the reconstruction error: ``x' = x + Σ_i (a'_i − a_i)·W_dec[i]``.

    ``features``: feature indices for every layer, or ``{layer: [indices]}``; ``value``: a number (0 ablates) or a
    function of the current activations ``[n_tokens, n_features] -> same shape``."""

    kind = "sae"

    def __init__(self, model: ModelAPI, saes: Mapping[int, SAE], features: Sequence[int] | Mapping[int, Sequence[int]],
                 *, value: float | Callable[[torch.Tensor], torch.Tensor] = 0.0, point: str = "resid_post",
                 **kwargs: Any):
        import torch

        if isinstance(features, Mapping):
            feats = {layer: list(f) for layer, f in features.items()}
        else:
            feats = {layer: list(features) for layer in saes}
        layers = list(feats)
        for layer in layers:
            if layer in saes:
                check_sae_for_edit(saes[layer], model, layer, point)
            if not feats[layer]:
                raise TellnormError(f"no feature to edit at layer {layer}")
        feats = check_features(saes, feats)
        if not callable(value) and not (is_number(value) and math.isfinite(value)):
            raise TellnormError(f"SAE feature value must be a finite number or a function of the activations, "
                                f"got {value!r}")
        self.saes = {layer: saes[layer] for layer in layers}
        self.features = {layer: torch.tensor([int(f) for f in feats[layer]], dtype=torch.long) for layer in layers}
        self.value = value
        super().__init__(model, layers, point=point, **kwargs)

    def apply(self, layer: int, x: torch.Tensor, mask: torch.Tensor, info: StepInfo) -> torch.Tensor:
        """``x + Σ_i (a'_i − a_i)·W_dec[i]`` on the tokens under ``mask`` (error term kept), ``x`` elsewhere."""
        import torch

        sae, index = self.saes[layer], self.features[layer]
        rows = x[mask]
        with torch.no_grad():
            acts = sae.encode(rows.to(sae.W_dec.dtype))[:, index]
            new = self.value(acts) if callable(self.value) else torch.full_like(acts, float(self.value))
            delta = (new - acts) @ sae.W_dec[index]
        return replace_rows(x, mask, rows + delta.to(x.dtype))


def edit_summary(edits: Sequence[Edit]) -> pd.DataFrame:
    """Every edit's per-(request, layer) summary in one DataFrame."""
    import pandas as pd

    parts = [e.record.summary() for e in edits]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def edited_tokens(model: ModelAPI, edits: Sequence[Edit], generations: Sequence[Generation]) -> pd.DataFrame:
    """Every decided token of ``edits`` joined with its string and masks (and on the organism its ground-truth
    label) from :func:`tellnorm.norms.token_table`."""
    import pandas as pd

    from tellnorm.norms import token_table

    tokens = token_table(model, generations).drop(columns=["is_generated"])
    frames = [e.record.frame() for e in edits]
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return frame.merge(tokens, on=["request_id", "position"], how="left", validate="many_to_one")
