"""Per-layer SAE quality on held-out text: L0, fraction of variance unexplained, dead features, and the increase
in next-token loss when the SAE's reconstruction replaces the residual stream (spliced in at that layer).

Everything streams over tokens (sums in float64), never caching ``[tokens, d_model]`` for the whole corpus.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tellnorm.generation import LayerHooks

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from sae_lens import SAE

    from tellnorm.backends.base import ModelAPI


@dataclass
class QualitySums:
    """Mergeable sufficient statistics of one layer's SAE over a token stream."""

    n_tokens: int = 0
    sum_sq_error: float = 0.0
    sum_sq: float = 0.0
    sum_x: torch.Tensor | None = None  # float64 [d_in]
    sum_l0: float = 0.0
    fired: torch.Tensor | None = None  # bool [d_sae]: feature was active at least once

    def add(self, x: torch.Tensor, recon: torch.Tensor, acts: torch.Tensor) -> None:
        """Accumulate tokens ``x`` ``[n, d_in]``, their reconstructions ``recon`` ``[n, d_in]`` and feature
        activations ``acts`` ``[n, d_sae]``."""
        import torch

        x64, r64 = x.double(), recon.double()
        self.n_tokens += x.shape[0]
        self.sum_sq_error += float(((x64 - r64) ** 2).sum())
        self.sum_sq += float((x64 ** 2).sum())
        sx = x64.sum(0)
        self.sum_x = sx if self.sum_x is None else self.sum_x + sx
        self.sum_l0 += float((acts > 0).sum())
        f = (acts > 0).any(0)
        self.fired = f if self.fired is None else self.fired | f
        del torch

    def merge(self, other: QualitySums) -> QualitySums:
        """The sums of both streams (a new object; inputs untouched)."""
        out = QualitySums(self.n_tokens + other.n_tokens, self.sum_sq_error + other.sum_sq_error,
                         self.sum_sq + other.sum_sq, self.sum_x + other.sum_x, self.sum_l0 + other.sum_l0,
                         self.fired | other.fired)
        return out

    def fvu(self) -> float:
        """Fraction of variance unexplained: Σ‖x − x̂‖² / Σ‖x − mean‖² (PAPER.md §3, A2)."""
        # Σ‖x − mean‖² = Σ‖x‖² − n‖mean‖²
        total_variance = self.sum_sq - float((self.sum_x ** 2).sum()) / self.n_tokens
        return self.sum_sq_error / total_variance


class _QualityObserver(LayerHooks):
    """Encodes every real token (position 0 excluded) at each SAE's hook and accumulates :class:`QualitySums`."""

    edits_stream = False  # records only (vLLM under tensor parallelism runs it on one rank)

    def __init__(self, model, saes: dict):
        super().__init__(model, saes)
        self.saes = saes
        self.sums: dict = {}

    def hook_for(self, layer):
        def hook(x, hook):
            mask = self.info.valid & (self.info.positions > 0)
            tokens = x[mask.to(x.device)].float()
            sae = self.saes[layer]
            acts = sae.encode(tokens)
            self.sums.setdefault(layer, QualitySums()).add(tokens, sae.decode(acts), acts)
            return x
        return hook


def sae_quality(model: ModelAPI, saes: dict[int, SAE], sequences: Sequence[Sequence[int]], *,
                n_prompt: Sequence[int] | None = None, batch_size: int = 16) -> pd.DataFrame:
    """One row per layer: n_tokens, L0, FVU, dead features (never active here), clean and spliced loss."""
    import pandas as pd

    from tellnorm.generation import run_forward

    observer = _QualityObserver(model, saes)
    run_forward(model, sequences, observers=[observer], batch_size=batch_size)
    clean = next_token_loss(model, sequences, n_prompt=n_prompt, batch_size=batch_size)
    rows = []
    for layer, sae in sorted(saes.items()):
        s = observer.sums[layer]
        spliced = next_token_loss(model, sequences, n_prompt=n_prompt, batch_size=batch_size, splice=(layer, sae))
        rows.append({"layer": layer, "d_sae": int(sae.cfg.d_sae), "n_tokens": s.n_tokens, "L0": s.sum_l0 / s.n_tokens,
                     "fvu": s.fvu(), "dead_features": int((~s.fired).sum()),
                     "dead_fraction": float((~s.fired).float().mean()), "loss_clean": clean,
                     "loss_spliced": spliced, "loss_increase": spliced - clean})
    return pd.DataFrame(rows)


def next_token_loss(model: ModelAPI, sequences: Sequence[Sequence[int]], *, n_prompt: Sequence[int] | None = None,
                    batch_size: int = 16, splice: tuple[int, SAE] | None = None) -> float:
    """Mean next-token loss over response tokens (all tokens after ``n_prompt[i]``), optionally with an SAE's
    reconstruction replacing the residual stream at ``splice = (layer, sae)`` on every position but 0."""
    import torch

    from tellnorm.generation import run_forward

    hooks = []
    if splice is not None:
        layer, sae = splice

        class _Splice(LayerHooks):
            def hook_for(self, layer_):
                def replace(x, hook):
                    out = sae.decode(sae.encode(x.float())).to(x.dtype)
                    out[:, 0] = x[:, 0]  # keep position 0 (and left padding) untouched: not SAE data
                    return out
                return replace

        hooks = [_Splice(model, [layer])]
    logits = run_forward(model, sequences, observers=hooks, batch_size=1 if splice else batch_size,
                         return_logits=True)
    total, count = 0.0, 0
    for i, seq in enumerate(sequences):
        start = n_prompt[i] if n_prompt is not None else 0
        target = torch.tensor(seq[start + 1:] if start + 1 < len(seq) else [], dtype=torch.long)
        if len(target) == 0:
            continue
        lp = torch.log_softmax(logits[i][start : len(seq) - 1].double(), dim=-1)
        total += float(-lp.gather(1, target[:, None]).sum())
        count += len(target)
    return total / max(count, 1)
