"""Reasoning features of per-layer SAEs (PAPER.md §2), streamed over tokens without an activation cache.

Both methods reduce to sums of SAE activations over token *buckets* (sets of token positions per request):
- the paper's contrast: buckets "thinking" and "non-thinking" (the same questions answered in both modes);
  ``Δ_i = mean_i(thinking) − mean_i(non-thinking)`` (absolute) or ``Δ_i / (mean_i(non-thinking) + ε)``
  (relative); the top-K features by Δ are the reasoning features and the per-layer "mean top-K feature score"
  is their mean activation.
- ReasonScore (Galichin et al. 2025): buckets "P" (windows around reasoning words), "N" (all other tokens) and
  one per word group r; ``ReasonScore_i = (μ⁺_i / Σ_j μ⁺_j) · H_i^α − μ⁻_i / Σ_j μ⁻_j`` with ``H_i`` the
  normalised entropy of feature i's mean activation across groups.

:class:`FeatureSums` holds the sufficient statistics (float64 sums and token counts per layer and bucket) and
merges, so the work can be sharded by prompt. Position 0 (massive activations) and padding never enter a bucket.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tellnorm.errors import TellnormError
from tellnorm.generation import LayerHooks

if TYPE_CHECKING:
    import random

    import pandas as pd
    import torch
    from sae_lens import SAE

    from tellnorm.backends.base import ModelAPI

# ReasonScore vocabulary (PAPER.md §2, Galichin et al. 2025): 10 word groups.
REASON_SCORE_GROUPS = ("alternatively", "hmm", "maybe", "wait", "perhaps", "let me", "therefore", "however", "but",
                       "another")
REASON_SCORE_ALPHA = 0.7  # PAPER §2: entropy exponent
WINDOW_LEFT, WINDOW_RIGHT = 1, 2  # PAPER §2: each occurrence widened 1 token left, 2 right
DEFAULT_TOP_K = 20  # PAPER §2: K below 40 ("Top-40 dilutes") [inferred: K ≈ 10–20]
RELATIVE_EPS = 1e-6  # PAPER §2: (think − nothink) / (nothink + ε)


@dataclass
class FeatureSums:
    """Per (layer, bucket): float64 sum of each feature's activation and the number of tokens. Mergeable."""

    sums: dict = field(default_factory=dict)  # (layer, bucket) -> tensor [d_sae]
    counts: dict = field(default_factory=dict)  # (layer, bucket) -> int

    def add(self, layer: int, bucket: str, acts: torch.Tensor) -> None:
        """Add ``acts`` ``[n_tokens, d_sae]`` (one row per token) to the (layer, bucket) sum and token count."""
        key = (layer, bucket)
        total = acts.double().sum(0)
        self.sums[key] = self.sums[key] + total if key in self.sums else total
        self.counts[key] = self.counts.get(key, 0) + acts.shape[0]

    def mean(self, layer: int, bucket: str) -> torch.Tensor:
        """Mean activation of each feature over the bucket's tokens, float64 ``[d_sae]``; raises when it has none."""
        key = (layer, bucket)
        if not self.counts.get(key):
            raise TellnormError(f"no tokens fell in bucket {bucket!r} at layer {layer}: nothing to average")
        return self.sums[key] / self.counts[key]

    def has(self, layer: int, bucket: str) -> bool:
        """Whether any token fell in ``bucket`` at ``layer``."""
        return bool(self.counts.get((layer, bucket)))

    def merge(self, other: FeatureSums) -> FeatureSums:
        """A new FeatureSums holding both shards' sums and counts added (neither input changes)."""
        out = FeatureSums(dict(self.sums), dict(self.counts))
        for key, value in other.sums.items():
            out.sums[key] = out.sums[key] + value if key in out.sums else value
            out.counts[key] = out.counts.get(key, 0) + other.counts[key]
        return out


BucketMasks = Mapping[object, Mapping[str, Sequence[bool]]]  # request_id -> bucket -> mask over positions


class FeatureSumsObserver(LayerHooks):
    """Observer for :func:`tellnorm.generation.run_forward`: encodes each SAE's hook activations and adds them to
    the buckets each token belongs to. ``fold_decoder_norm`` multiplies activation i by ‖W_dec[i]‖."""

    edits_stream = False  # records only (vLLM under tensor parallelism runs it on one rank)

    def __init__(self, model: ModelAPI, saes: Mapping[int, SAE], bucket_masks: BucketMasks, *,
                 fold_decoder_norm: bool = False):
        import torch

        super().__init__(model, saes)
        self.saes = dict(saes)
        self.sums = FeatureSums()
        self._masks = {rid: {b: torch.as_tensor(m, dtype=torch.bool) for b, m in buckets.items()}
                       for rid, buckets in bucket_masks.items()}
        self._scale = {layer: (sae.W_dec.detach().norm(dim=-1) if fold_decoder_norm else None)
                       for layer, sae in self.saes.items()}

    def hook_for(self, layer: int) -> Callable[..., Any]:
        """The hook at ``layer``: encodes ``x`` ``[batch, seq, d_model]`` and adds each token to its buckets."""
        import torch

        def hook(x, hook):
            info = self.info
            with torch.no_grad():
                for row, rid in enumerate(info.request_ids):
                    buckets = self._masks.get(rid)
                    if not buckets:
                        continue
                    real = info.valid[row] & (info.positions[row] > 0)
                    positions = info.positions[row][real]
                    acts = self.saes[layer].encode(x[row][real.to(x.device)].float())
                    if self._scale[layer] is not None:
                        acts = acts * self._scale[layer]
                    for bucket, mask in buckets.items():
                        inside = positions < len(mask)
                        selected = torch.zeros_like(positions, dtype=torch.bool)
                        selected[inside] = mask[positions[inside]]
                        if selected.any():
                            self.sums.add(layer, bucket, acts[selected.to(acts.device)])
            return x
        return hook


def collect_feature_sums(model: ModelAPI, saes: Mapping[int, SAE], sequences: Sequence[Sequence[int]],
                         bucket_masks: BucketMasks, *, request_ids: Sequence | None = None,
                         fold_decoder_norm: bool = False, batch_size: int = 16) -> FeatureSums:
    """One teacher-forced pass over ``sequences`` summing each SAE's activations per bucket (PAPER.md §2).

    Shard by calling on prompt subsets, then :meth:`FeatureSums.merge`."""
    from tellnorm.generation import run_forward

    observer = FeatureSumsObserver(model, saes, bucket_masks, fold_decoder_norm=fold_decoder_norm)
    run_forward(model, sequences, request_ids=request_ids, observers=[observer], batch_size=batch_size)
    return observer.sums


# --- (a) the paper's thinking vs non-thinking contrast -----------------------------------------------------------

def contrast_masks(sequences: Sequence[Sequence[int]], n_prompt: Sequence[int], modes: Sequence[str], *,
                   scope: str = "generated") -> dict[int, dict[str, list[bool]]]:
    """Bucket masks for the contrast: each request's tokens go to its mode's bucket.

    ``scope="generated"`` (paper code: decode steps only) or ``"all"`` (prompt and response)."""
    if scope not in ("generated", "all"):
        raise TellnormError(f"unknown token scope {scope!r}: choose 'generated' or 'all'")
    masks = {}
    for i, (seq, k, mode) in enumerate(zip(sequences, n_prompt, modes)):
        start = k if scope == "generated" else 1
        masks[i] = {mode: [start <= p for p in range(len(seq))]}
    return masks


MATCHED_SUFFIX = "@matched"
MATCHED_REQUEST_BUCKET = "@matched/{}"  # one request's matched tokens: per-problem sums for bootstrap CIs


def matched_contrast_masks(matched_positions: Sequence[Sequence[int]], lengths: Sequence[int],
                           modes: Sequence[str]) -> dict[int, dict[str, list[bool]]]:
    """Bucket masks of a token-matched contrast: only positions both modes' responses have (e.g. the closing
    ``answer : X``) enter the buckets ``"<mode>@matched"``, and each request's own ``"@matched/<i>"``."""
    masks = {}
    for i, (positions, length, mode) in enumerate(zip(matched_positions, lengths, modes)):
        chosen = set(positions)
        mask = [p in chosen and p > 0 for p in range(length)]
        masks[i] = {mode + MATCHED_SUFFIX: mask, MATCHED_REQUEST_BUCKET.format(i): mask}
    return masks


def contrast_table(sums: FeatureSums, layers: Sequence[int],
                   buckets: tuple[str, str] = ("thinking", "non-thinking")) -> pd.DataFrame:
    """Per layer and feature: mean activation in each mode, absolute and relative differential Δ (PAPER.md §2),
    rank by Δ.

    ``buckets`` names the thinking and the non-thinking bucket (e.g. the token-matched ones)."""
    import pandas as pd

    frames = []
    for layer in layers:
        think, nothink = sums.mean(layer, buckets[0]), sums.mean(layer, buckets[1])
        delta = think - nothink
        f = pd.DataFrame({"layer": layer, "feature": range(len(delta)), "mean_thinking": think.numpy(),
                          "mean_non_thinking": nothink.numpy(), "delta": delta.numpy(),
                          "relative_delta": (delta / (nothink + RELATIVE_EPS)).numpy()})
        f["rank"] = f["delta"].rank(ascending=False, method="first").astype(int)
        frames.append(f.sort_values("rank"))
    return pd.concat(frames, ignore_index=True)


def top_k_scores(table: pd.DataFrame, *, k: int = DEFAULT_TOP_K, by: str = "delta") -> pd.DataFrame:
    """The per-layer "mean top-K feature score" (PAPER.md §2): mean activation of the layer's top-K features by
    ``by``, in each mode (features are chosen by the contrast itself, so the thinking curve is above the other by
    design; the question is how the gap and the level change with depth)."""
    import pandas as pd

    if k < 1:
        raise TellnormError(f"top-K needs K ≥ 1, got {k}")
    rows = []
    for layer, g in table.groupby("layer"):
        top = g.nlargest(k, by)
        rows.append({"layer": layer, "k": k, "thinking": top["mean_thinking"].mean(),
                     "non-thinking": top["mean_non_thinking"].mean(), "mean_delta": top["delta"].mean()})
    return pd.DataFrame(rows)


# --- (b) ReasonScore ----------------------------------------------------------------------------------------------

def word_variants(word: str) -> list[str]:
    """Case and leading-space variants of a vocabulary entry (``wait``, ``Wait``, `` wait``, `` Wait``)."""
    forms = {word, word.capitalize()}
    return sorted(forms | {" " + f for f in forms})


def vocabulary_token_ids(tokenizer: Any,
                         groups: Sequence[str] = REASON_SCORE_GROUPS) -> dict[str, list[tuple[int, ...]]]:
    """Token-id sequences of every variant of every group; words the tokenizer cannot encode are skipped loudly."""
    vocab: dict[str, list[tuple[int, ...]]] = {}
    unk = tokenizer.unk_token_id
    for group in groups:
        seqs = set()
        for variant in word_variants(group):
            ids = tuple(tokenizer(variant, add_special_tokens=False)["input_ids"])
            if ids and (unk is None or unk not in ids):
                seqs.add(ids)
        if seqs:
            vocab[group] = sorted(seqs)
        else:
            warnings.warn(f"ReasonScore: the tokenizer cannot encode {group!r}; skipping that word group",
                          stacklevel=2)
    if not vocab:
        raise TellnormError("ReasonScore: the tokenizer encodes none of the vocabulary words; give another vocabulary")
    return vocab


def reason_score_masks(sequences: Sequence[Sequence[int]], vocab: Mapping[str, list[tuple[int, ...]]], *,
                       ignore_ids: set[int] | frozenset[int] = frozenset(),
                       start: Sequence[int] | None = None) -> dict[int, dict[str, list[bool]]]:
    """Bucket masks (PAPER.md §2): "P" (union of windows), "N" (other tokens), "group:<r>" (windows of group r).

    Matches are token-id subsequences; each occurrence [s, e) becomes the window [s − 1, e − 1 + 2]. Tokens in
    ``ignore_ids`` (BOS/EOS/padding) and positions before ``start[i]`` belong to no bucket."""
    masks = {}
    for i, seq in enumerate(sequences):
        n = len(seq)
        first = max(1, start[i] if start is not None else 1)
        eligible = [p >= first and seq[p] not in ignore_ids for p in range(n)]
        groups = {}
        for group, patterns in vocab.items():
            window = [False] * n
            for pattern in patterns:
                m = len(pattern)
                for s in range(first, n - m + 1):
                    if tuple(seq[s : s + m]) == pattern:
                        for p in range(max(0, s - WINDOW_LEFT), min(n, s + m - 1 + WINDOW_RIGHT + 1)):
                            window[p] = True
            groups[group] = [w and e for w, e in zip(window, eligible)]
        positive = [any(g[p] for g in groups.values()) for p in range(n)]
        buckets = {"P": positive, "N": [e and not pos for e, pos in zip(eligible, positive)]}
        buckets.update({f"group:{g}": m for g, m in groups.items()})
        masks[i] = buckets
    return masks


def reason_score(mu_pos: torch.Tensor, mu_neg: torch.Tensor, mu_groups: torch.Tensor, *,
                 alpha: float = REASON_SCORE_ALPHA) -> tuple[torch.Tensor, torch.Tensor]:
    """ReasonScore (PAPER.md §2) from the three kinds of means: ``mu_pos``, ``mu_neg`` ``[d_sae]``, ``mu_groups``
    ``[|R|, d_sae]``. Returns ``(score, normalised entropy H)``, both float64 ``[d_sae]``."""
    import math

    import torch

    mu_pos, mu_neg, mu_groups = mu_pos.double(), mu_neg.double(), mu_groups.double()
    n_groups = mu_groups.shape[0]
    if n_groups == 1:
        entropy = torch.ones_like(mu_pos)
    else:
        total = mu_groups.sum(0, keepdim=True)
        p = torch.where(total > 0, mu_groups / total.clamp_min(1e-30), torch.zeros_like(mu_groups))
        plogp = torch.where(p > 0, p * p.clamp_min(1e-30).log(), torch.zeros_like(p))
        entropy = -plogp.sum(0) / math.log(n_groups)
    pos_share = mu_pos / mu_pos.sum().clamp_min(1e-30)
    neg_share = mu_neg / mu_neg.sum().clamp_min(1e-30)
    return pos_share * entropy.clamp_min(0) ** alpha - neg_share, entropy


def reason_score_table(sums: FeatureSums, layers: Sequence[int], groups: Sequence[str], *,
                       alpha: float = REASON_SCORE_ALPHA) -> pd.DataFrame:
    """Per layer and feature: ReasonScore (PAPER.md §2), its entropy, μ⁺, μ⁻ and rank, from the bucket sums of
    :func:`reason_score_masks`."""
    import pandas as pd
    import torch

    frames = []
    for layer in layers:
        present = [g for g in groups if sums.has(layer, f"group:{g}")]
        if not present or not sums.has(layer, "P"):
            raise TellnormError(f"ReasonScore: no reasoning-word occurrence reached layer {layer}; "
                                "use text with reasoning words or another vocabulary")
        mu_groups = torch.stack([sums.mean(layer, f"group:{g}") for g in present])
        score, entropy = reason_score(sums.mean(layer, "P"), sums.mean(layer, "N"), mu_groups, alpha=alpha)
        f = pd.DataFrame({"layer": layer, "feature": range(len(score)), "reason_score": score.numpy(),
                          "entropy": entropy.numpy(), "mu_pos": sums.mean(layer, "P").numpy(),
                          "mu_neg": sums.mean(layer, "N").numpy(), "n_groups_present": len(present)})
        f["rank"] = f["reason_score"].rank(ascending=False, method="first").astype(int)
        frames.append(f.sort_values("rank"))
    return pd.concat(frames, ignore_index=True)


# --- (c) controls -------------------------------------------------------------------------------------------------

def inject_words(sequence: Sequence[int], word_ids: Sequence[tuple[int, ...]], *, every: int, start: int,
                 rng: random.Random) -> tuple[list[int], list[int]]:
    """Paste reasoning words into a token sequence after position ``start`` every ``every`` tokens; returns the new
    sequence and the positions where injected words begin."""
    out, injected = list(sequence[:start]), []
    for i, tok in enumerate(sequence[start:]):
        if i and i % every == 0:
            word = word_ids[rng.randrange(len(word_ids))]
            injected.append(len(out))
            out.extend(word)
        out.append(tok)
    return out, injected


def label_overlap(model: ModelAPI, saes: Mapping[int, SAE], sequences: Sequence[Sequence[int]],
                  labels: Sequence[Sequence[str]], features: Mapping[int, Sequence[int]], *,
                  batch_size: int = 16) -> pd.DataFrame:
    """For chosen features: mean activation on tokens of each ground-truth label, and the share of the
    feature's total activation that falls on each label (organism only: labels from the task grammar)."""
    import pandas as pd

    label_names = sorted({lab for seq_labels in labels for lab in seq_labels if lab})
    masks = {i: {lab: [x == lab for x in seq_labels] for lab in label_names} for i, seq_labels in enumerate(labels)}
    sums = collect_feature_sums(model, {l: saes[l] for l in features}, sequences, masks, batch_size=batch_size)
    rows = []
    for layer, feats in features.items():
        present = [lab for lab in label_names if sums.has(layer, lab)]
        totals = {lab: sums.sums[(layer, lab)] for lab in present}
        n_present = sum(sums.counts[(layer, x)] for x in present)
        for f in feats:
            mass = sum(float(totals[lab][f]) for lab in present)
            for lab in present:
                rows.append({"layer": layer, "feature": f, "label": lab,
                             "mean_activation": float(sums.mean(layer, lab)[f]),
                             "share_of_activation": float(totals[lab][f]) / mass if mass > 0 else float("nan"),
                             "share_of_tokens": sums.counts[(layer, lab)] / n_present})
    return pd.DataFrame(rows)


def check_features(saes: Mapping[int, SAE], features: Mapping[int, Sequence[int]]) -> dict[int, list[int]]:
    """``{layer: [feature id, ...]}`` with every id an integer that exists in its layer's SAE (duplicates dropped,
    order kept), or one TellnormError line saying which id or layer is wrong. The one feature-id check of tellnorm."""
    import numbers

    if not features or not any(len(list(v)) for v in features.values()):
        raise TellnormError("no features chosen: the feature list is empty; name at least one feature id "
                            "(e.g. --features 6:12)")
    checked = {}
    for layer, feats in features.items():
        if layer not in saes:
            raise TellnormError(f"no SAE for layer {layer}: available layers are {sorted(saes)}")
        d_sae = int(saes[layer].cfg.d_sae)
        ids: list[int] = []
        for f in feats:
            if isinstance(f, bool) or not isinstance(f, numbers.Integral):
                raise TellnormError(f"feature id {f!r} is not an integer: feature ids index the layer-{layer} SAE's "
                                    f"d_sae={d_sae} latents")
            if not 0 <= int(f) < d_sae:
                raise TellnormError(f"feature {int(f)} does not exist at layer {layer}: its SAE has d_sae={d_sae} "
                                    f"features (ids 0..{d_sae - 1})")
            if int(f) not in ids:
                ids.append(int(f))
        checked[layer] = ids
    return checked


# --- choosing SAEs and the reasoning features for an analysis ------------------------------------------------

def select_saes(model: ModelAPI, saes: Mapping[int, SAE], *, top_k: int, layers: Sequence[int] | None = None,
                architectures: Sequence[str] | None = None, min_layers: int = 1) -> dict[int, SAE]:
    """The SAEs of ``layers`` (default: all), each checked: on the model, reading the residual stream after its
    block, K within its width, and (``architectures``) one of the SAE architectures an analysis is derived for."""
    from tellnorm.saes.loading import validate_sae

    if not saes:
        raise TellnormError("no SAEs given: load at least one with tellnorm.saes.load_saes")
    chosen = sorted(saes) if layers is None else list(layers)
    for layer in chosen:
        if layer not in saes:
            raise TellnormError(f"no SAE for layer {layer}: available layers are {sorted(saes)}")
    if len(chosen) < min_layers:
        raise TellnormError(f"a rank correlation across layers needs SAEs on at least {min_layers} layers, "
                            f"got layers {chosen}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise TellnormError(f"top-K needs an integer K ≥ 1, got {top_k!r}")
    for layer in chosen:
        sae = saes[layer]
        validate_sae(sae, model, layer)
        hook = sae.cfg.metadata.hook_name
        if hook not in (model.hook_name(layer), f"blocks.{layer}.hook_out"):
            raise TellnormError(f"the layer-{layer} SAE reads {hook!r}, but these analyses read the residual stream "
                                f"after block {layer} ({model.hook_name(layer)}): use resid_post SAEs")
        d_sae = int(sae.cfg.d_sae)
        if top_k > d_sae:
            raise TellnormError(f"top-K is {top_k} but the layer-{layer} SAE has only d_sae={d_sae} features")
        if architectures is not None:
            arch = sae.cfg.architecture()
            if arch not in architectures:
                raise TellnormError(f"the layer-{layer} SAE is {arch!r}: the exact bound is derived for "
                                    f"{', '.join(architectures)} SAEs")
    return {layer: saes[layer] for layer in chosen}


def check_corpus(corpus: Any) -> None:
    """One TellnormError line unless ``corpus`` (with ``sequences``, ``n_prompt``, ``modes``, e.g. what
    :func:`tellnorm.studies.corpus.contrast_corpus` returns) has response tokens in both modes."""
    if corpus is None or not getattr(corpus, "sequences", None):
        raise TellnormError("the corpus is empty: generate responses first (e.g. --n 1 or more problems per level)")
    for mode in ("thinking", "non-thinking"):
        ids = [i for i, m in enumerate(corpus.modes) if m == mode]
        if not any(len(corpus.sequences[i]) > corpus.n_prompt[i] for i in ids):
            raise TellnormError(f"the corpus has no {mode} response tokens: the contrast needs both modes")


def reasoning_features(model: ModelAPI, saes: Mapping[int, SAE], corpus: Any, *, top_k: int = DEFAULT_TOP_K,
                       scope: str = "generated", batch_size: int = 16,
                       collect: Callable[..., FeatureSums] | None = None) -> tuple[dict[int, list[int]], pd.DataFrame]:
    """R per layer: the top-K features by the paper's contrast Δ (decoder-norm folded, exactly as
    :func:`tellnorm.studies.features.feature_study` and :func:`tellnorm.features.top_k_scores` choose them).

    ``collect``: a stand-in for :func:`tellnorm.features.collect_feature_sums` (e.g.
    a sharded collector). Returns ``({layer: [feature, ...]}, contrast
    table)``."""
    masks = contrast_masks(corpus.sequences, corpus.n_prompt, corpus.modes, scope=scope)
    collect = collect or collect_feature_sums
    sums = collect(model, saes, corpus.sequences, masks, fold_decoder_norm=True, batch_size=batch_size)
    table = contrast_table(sums, sorted(saes))
    chosen = {int(layer): g.nlargest(top_k, "delta")["feature"].astype(int).tolist()
              for layer, g in table.groupby("layer")}
    return chosen, table
