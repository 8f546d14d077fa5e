"""Per-layer signals of a hidden state, streamed per problem: the SAE reasoning activation, the norm and the
competing signals the paper compares it with (PAPER.md §4): the logit-lens output entropy per layer, the entropy of
the normalised hidden state, the attention entropy, and the final output entropy.

:class:`SignalObserver` accumulates :class:`SignalSums` (per problem, per layer) in one teacher-forced pass;
:func:`collect_signals` runs it. The study over them is :mod:`tellnorm.studies.correlation`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from tellnorm.errors import TellnormError
from tellnorm.generation import LayerHooks, StepInfo

if TYPE_CHECKING:
    import torch
    from sae_lens import SAE

    from tellnorm.backends.base import ModelAPI

REFERENCE = "reasoning_activation"
LAYER_SIGNALS = ("norm", "layer_output_entropy", "hidden_state_entropy", "attention_entropy")
FINAL = "final_output_entropy"
PROFILE_SIGNALS = (REFERENCE,) + LAYER_SIGNALS
MIN_LAYERS = 3  # a rank correlation across fewer layers says nothing
ENTROPY_CHUNK = 256  # tokens per chunk of SAE encoding and float64 softmax (a real vocabulary is ~150k wide)
# --- pure core: entropies and Spearman ----------------------------------------------------------------------------

def entropy_from_logits(logits: torch.Tensor, chunk: int = ENTROPY_CHUNK) -> torch.Tensor:
    """``H(softmax(logits))`` of ``logits`` ``[T, vocab]`` per row in nats, float64 ``[T]`` (computed in float64,
    ``chunk`` rows at a time)."""
    import torch

    out = []
    for start in range(0, logits.shape[0], chunk):
        logp = torch.log_softmax(logits[start : start + chunk].double(), dim=-1)
        out.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def distribution_entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``−Σ p log p`` along ``dim`` (0·log 0 = 0), float64."""
    import torch

    p = p.double()
    return -torch.special.xlogy(p, p).sum(dim)


def hidden_state_entropy(h: torch.Tensor) -> torch.Tensor:
    """Entropy of ``h_j² / ‖h‖²`` over the coordinates of ``h`` ``[T, d_model]``, per row (float64 ``[T]``; 0 for a
    zero vector). PAPER.md §4's hidden-state entropy."""
    sq = h.double() ** 2
    return distribution_entropy(sq / sq.sum(-1, keepdim=True).clamp_min(1e-300))


def attention_entropy(rows: torch.Tensor) -> torch.Tensor:
    """PAPER.md §4's attention entropy: mean over heads of the entropy of each attention row: ``rows``
    ``[T, heads, keys]`` → float64 ``[T]``."""
    return distribution_entropy(rows).mean(-1)


# --- streaming per-problem sums -----------------------------------------------------------------------------------

@dataclass
class SignalSums:
    """Per problem: its token count, and per signal the sum over its tokens (per layer; final entropy: one sum).

    Mergeable over shards of problems (a problem seen in two shards adds up)."""

    layers: list
    problems: dict = field(default_factory=dict)  # problem id -> {"count": int, FINAL: float, signal: ndarray[L]}

    def entry(self, problem: Hashable) -> dict:
        """The sums of ``problem`` (created empty on first use): ``{"count", FINAL, signal: ndarray [L]}``."""
        if problem not in self.problems:
            self.problems[problem] = {"count": 0, FINAL: 0.0,
                                      **{s: np.zeros(len(self.layers)) for s in PROFILE_SIGNALS}}
        return self.problems[problem]

    def merge(self, other: SignalSums) -> SignalSums:
        """A new SignalSums of both shards (a problem in both adds up); the layers must match."""
        if list(other.layers) != list(self.layers):
            raise TellnormError("cannot merge signal sums over different layers")
        out = SignalSums(list(self.layers))
        for source in (self, other):
            for problem, e in source.problems.items():
                mine = out.entry(problem)
                for key, value in e.items():
                    mine[key] = mine[key] + value
        return out

    def arrays(self) -> tuple[list, np.ndarray, dict[str, np.ndarray], np.ndarray]:
        """``(problem ids, counts [P], {signal: sums [P, L]}, final sums [P])`` over problems with tokens."""
        ids = [p for p in self.problems if self.problems[p]["count"] > 0]
        counts = np.array([self.problems[p]["count"] for p in ids], dtype=np.float64)
        sums = {s: np.array([self.problems[p][s] for p in ids]).reshape(len(ids), len(self.layers))
                for s in PROFILE_SIGNALS}
        return ids, counts, sums, np.array([self.problems[p][FINAL] for p in ids], dtype=np.float64)


def _original(module):
    """The HF module under a TransformerBridge wrapper (calling the wrapper would fire its hooks again)."""
    return getattr(module, "_original_component", module)


def lens_logits(model: ModelAPI, h: torch.Tensor) -> torch.Tensor:
    """The logit lens, ``[T, vocab]`` from ``h`` ``[T, d_model]``: ``h`` through the model's own final norm,
    unembedding and HF's post-unembedding steps (Granite's ``logits_scaling``, Gemma 2/3's final-logit soft cap), so
    at the last layer it is the model's output."""
    import torch

    config = model.hf_model.config
    logits = _original(model.hf_model.lm_head)(_original(model.hf_model.model.norm)(h))
    scaling = getattr(config, "logits_scaling", None)
    if scaling is not None and scaling != 1:
        logits = logits / scaling
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


class SignalObserver(LayerHooks):
    """Observer for :func:`tellnorm.generation.run_forward`: adds every signal of the selected tokens (those at or
    after ``starts[request_id]``, position 0 never) to per-problem :class:`SignalSums`."""

    edits_stream = False  # records only (vLLM under tensor parallelism runs it on one rank)

    reads_logits = True  # every position's logits (the final output entropy): teacher-forced passes keep them

    def __init__(self, model: ModelAPI, saes: Mapping[int, SAE], reasoning: Mapping[int, Sequence[int]],
                 starts: Mapping[Any, int]):
        import torch

        super().__init__(model, saes)
        self.saes = dict(saes)
        self.reasoning = {layer: torch.as_tensor(list(reasoning[layer]), dtype=torch.long) for layer in self.saes}
        self.fold = {layer: sae.W_dec.detach().norm(dim=-1)[self.reasoning[layer]].double()
                     for layer, sae in self.saes.items()}
        self.starts = dict(starts)
        self.sums = SignalSums(list(self.layers))
        self.attention_seen = set()
        self._select = None
        self._slot_ids: list = []  # request ids of this batch's selected tokens, in first-seen order
        self._slot = np.zeros(0, dtype=np.int64)  # per selected token: index into _slot_ids

    def hooks(self, model: ModelAPI | None = None) -> list[tuple[str, Any]]:
        """The layer hooks, plus each layer's attention-pattern hook and the final-logits hook."""
        patterns = [(f"blocks.{layer}.attn.hook_pattern", self._pattern_hook(i)) for i, layer in enumerate(self.layers)]
        return super().hooks(model) + patterns + [("unembed.hook_out", self._logits_hook)]

    def on_step(self, info: StepInfo) -> None:
        """Select the pass's tokens (real, position ≥ the request's start, never 0) and count them per problem."""
        import torch

        super().on_step(info)
        start = torch.tensor([max(1, self.starts.get(rid, 1 << 30)) for rid in info.request_ids])
        self._select = info.valid & (info.positions >= start[:, None])
        rows = self._select.nonzero(as_tuple=True)[0].numpy()
        self._slot_ids = list(dict.fromkeys(info.request_ids[r] for r in rows))
        slot_of = {rid: k for k, rid in enumerate(self._slot_ids)}
        self._slot = np.array([slot_of[info.request_ids[r]] for r in rows], dtype=np.int64)
        for rid, n in zip(self._slot_ids, np.bincount(self._slot, minlength=len(self._slot_ids))):
            self.sums.entry(rid)["count"] += int(n)

    def _add(self, signal: str, index: int | None, values) -> None:
        totals = np.bincount(self._slot, weights=values.double().cpu().numpy(), minlength=len(self._slot_ids))
        for rid, total in zip(self._slot_ids, totals):
            e = self.sums.entry(rid)
            if index is None:
                e[signal] += float(total)
            else:
                e[signal][index] += float(total)

    def _selected(self, tensor):
        return tensor[self._select.to(tensor.device)]

    def hook_for(self, layer: int) -> Callable[..., Any]:
        """The hook at ``layer``: adds the norm, reasoning activation, logit-lens and hidden-state entropies of the
        selected tokens of ``x`` ``[batch, seq, d_model]``; returns ``x`` unchanged."""
        import torch

        i = self.layers.index(layer)

        def hook(x, hook):
            if self._select is None or not self._slot_ids:
                return x
            with torch.no_grad():
                h = self._selected(x).float()
                R, sae = self.reasoning[layer], self.saes[layer]
                reason = torch.cat([(sae.encode(h[s : s + ENTROPY_CHUNK])[:, R].double() * self.fold[layer]).sum(-1)
                                    for s in range(0, h.shape[0], ENTROPY_CHUNK)]) / len(R)
                self._add("norm", i, torch.linalg.vector_norm(h.double(), dim=-1))
                self._add(REFERENCE, i, reason)
                self._add("layer_output_entropy", i, self.logit_lens_entropy(h))
                self._add("hidden_state_entropy", i, hidden_state_entropy(h))
            return x
        return hook

    def logit_lens_entropy(self, h: torch.Tensor) -> torch.Tensor:
        """``H(softmax(lens_logits(h)))`` per row of ``h`` ``[T, d_model]`` (float64 ``[T]``), ``ENTROPY_CHUNK`` rows
        at a time: PAPER.md §4's layer output entropy."""
        import torch

        parts = [entropy_from_logits(lens_logits(self.model, h[s : s + ENTROPY_CHUNK]))
                 for s in range(0, h.shape[0], ENTROPY_CHUNK)]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)

    def _pattern_hook(self, i: int):
        def hook(pattern, hook):
            if self._select is not None and self._slot_ids:
                rows = self._selected(pattern.transpose(1, 2))  # [T, heads, keys]
                self._add("attention_entropy", i, attention_entropy(rows))
                self.attention_seen.add(i)
            return pattern
        return hook

    def _logits_hook(self, logits, hook):
        if self._select is not None and self._slot_ids:
            self._add(FINAL, None, entropy_from_logits(self._selected(logits)))
        return logits


def collect_signals(model: ModelAPI, saes: Mapping[int, SAE], reasoning: Mapping[int, Sequence[int]],
                    sequences: Sequence[Sequence[int]], starts: Mapping[Any, int], *,
                    request_ids: Sequence | None = None, batch_size: int = 16) -> SignalObserver:
    """One teacher-forced pass; returns the observer (its ``sums``, and which layers exposed attention)."""
    from tellnorm.generation import run_forward

    observer = SignalObserver(model, saes, reasoning, starts)
    run_forward(model, sequences, request_ids=request_ids, observers=[observer], batch_size=batch_size)
    return observer


