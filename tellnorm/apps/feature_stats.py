"""What the feature dashboards and the explorer compute alike: SAE encoding in chunks, logit effects, the Pearson
correlation of a feature with ‖h‖₂ and masked means, token display text and the SAE's name.

Both apps accumulate their sums their own way (the dashboards stream dense co-moments batch by batch, the explorer
sums sparse entries of a whole layer with ``np.bincount``); the statistics are derived from those sums here, with
the same float64 operations for both.

Logit effects are the decoder direction through the unembedding, ``W_dec[f] @ W_U`` with
``W_U = lm_head.weight.T`` (the final RMSNorm and its scale ignored, as usual for logit-lens views).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

LOGIT_CHUNK_ELEMENTS = 1 << 25  # W_dec[chunk] @ W_U is computed for ≤ 32M (feature, vocab) entries at a time


def display_tokens(model: Any, ids: Iterable[int]) -> list[str]:
    """Per-token display text: decoded (byte-level BPE markers become spaces), the raw token if that is empty."""
    ids = [int(i) for i in ids]
    raw = model.token_strings(ids)
    out = []
    for i, tok in zip(ids, raw):
        try:
            text = model.tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        except Exception:  # some tokenizers cannot decode lone byte tokens
            text = ""
        out.append(text if text else (tok or ""))
    return out


def sae_name(sae: Any) -> str:
    """``release / sae_id`` from the SAE's metadata, else its class and width."""
    meta = getattr(sae.cfg, "metadata", None)
    name = " / ".join(str(x) for x in (getattr(meta, "release", None), getattr(meta, "sae_id", None)) if x)
    return name or f"{type(sae).__name__} d_sae={int(sae.cfg.d_sae)}"


def encode_chunks(sae: Any, h: torch.Tensor, chunk: int,
                  index: torch.Tensor | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, activations)`` of ``sae.encode(h[start:start + chunk])``, float32 on the CPU (``index``: only
    those features), for ``h`` ``[tokens, d_model]`` moved to the SAE's device and dtype a chunk at a time."""
    param = sae.W_dec
    if index is not None:
        index = index.to(param.device)
    for start in range(0, len(h), chunk):
        acts = sae.encode(h[start:start + chunk].to(device=param.device, dtype=param.dtype))
        if index is not None:
            acts = acts.index_select(-1, index)
        yield start, acts.float().cpu()


def unembedding(model: Any) -> torch.Tensor:
    """``W_U = lm_head.weight.T`` in float32, ``[d_model, vocab]`` (a view when the weights are float32)."""
    return model.hf_model.lm_head.weight.detach().float().T


def logit_tops(directions: torch.Tensor, W_U: torch.Tensor, k: int, *,
               chunk_elements: int = LOGIT_CHUNK_ELEMENTS) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Top-``k`` promoted and suppressed vocabulary ids and values of ``directions @ W_U``: ``(up_ids, up_values,
    down_ids, down_values)`` (``down_values`` the negative effects, most negative first). ``directions``: one
    decoder row ``[d_model]`` (arrays ``[k]``) or rows ``[n, d_model]`` (arrays ``[n, k]``), multiplied a chunk of
    rows at a time so that no more than ``chunk_elements`` effects exist at once."""
    import torch

    vocab = int(W_U.shape[1])
    k = min(k, vocab)
    if directions.dim() == 1:
        blocks = [directions]
    else:
        chunk = max(1, chunk_elements // max(vocab, 1))
        blocks = [directions[a:a + chunk] for a in range(0, int(directions.shape[0]), chunk)]
    parts: list[list] = [[], [], [], []]
    with torch.no_grad():
        for block in blocks:
            effect = block.detach().to(device=W_U.device, dtype=torch.float32) @ W_U
            up, down = torch.topk(effect, k, dim=-1), torch.topk(-effect, k, dim=-1)
            for part, t in zip(parts, (up.indices, up.values, down.indices, -down.values)):
                part.append(t.cpu())
    return tuple(torch.cat(p).numpy() for p in parts)


def safe_mean(total: Any, count: Any) -> np.ndarray:
    """``total / count`` in float64, NaN where ``count`` is 0."""
    total, count = np.asarray(total, dtype=np.float64), np.asarray(count)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def norm_correlation(cov: Any, var_x: Any, var_y: Any) -> np.ndarray:
    """Pearson r = cov / sqrt(var_x · var_y) in float64, clipped to [-1, 1]; NaN where a variance is 0.

    Any common scale works: (co)variances, or co-moments and sums of squared deviations."""
    cov, var_x = np.asarray(cov, dtype=np.float64), np.asarray(var_x, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        denom = np.sqrt(np.clip(var_x, 0, None) * var_y)
        return np.clip(np.where(denom > 0, cov / denom, np.nan), -1, 1)


def optional(x: Any) -> float | None:
    """A float, None for NaN."""
    x = float(x)
    return None if np.isnan(x) else x
