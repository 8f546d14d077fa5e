"""The explorer's data: every feature of every layer from a contrast corpus, streamed one layer at a time.

:func:`iter_explorer_docs` yields the site's JSON documents as ``(name, doc)`` pairs, in this order:

1. one teacher-forced pass (:func:`tellnorm.generation.run_forward`) records ‖h‖₂ of every real token (no padding,
   no position 0: massive activations, PAPER.md §1) at every SAE layer and every technique layer; from it the
   per-layer calibrated peak threshold τ = Q3 + k·IQR (:func:`tellnorm.thresholds.calibrated_thresholds`, over the
   corpus's generated tokens), the ``corpus`` and ``norms`` documents (the norm view: example responses, thinking
   and non-thinking, one per difficulty, with ‖h‖₂ per layer and, for the organism, the ground-truth labels);
2. the ``techniques`` document: the norm view's example prompts decoded again (greedy, same length limit) under
   ALRR, ERSS and high-norm suppression (``Scale(0.1)`` on tokens above τ, as the suppression study), each with
   the same τ, and per run the response's tokens and every decision the edit recorded (ALRR: extra pass run, and
   kept or not; ERSS: injection; suppression: scaled);
3. per SAE layer, one at a time: the layer's real tokens are encoded with its SAE and only the *non-zero*
   activations (token, feature, value) are kept; the layer's ``index_L<l>`` and ``features_L<l>_<k>`` shards
   (``SHARD`` features each) are computed with vectorised numpy and yielded before the next layer is encoded, so
   at most one layer's activations and statistics exist at a time (a 32-layer × 65k-feature suite is built in the
   memory of one layer). The vectors come from the first pass when every SAE layer's fit in
   ``residual_cache_bytes`` (small models), otherwise from a pass of the model hooked at that layer only;
4. ``meta`` last (it lists every layer).

Per feature: density (share of eligible tokens where it fires), mean activation (over all eligible tokens), mean
when active, max, Pearson r with ‖h‖₂ of the vector the SAE reads, an activation histogram; the paper's contrast
Δ = mean(thinking) − mean(non-thinking) over generated tokens and relative Δ, and ReasonScore (Galichin et al.),
both with the decoder norm folded in exactly as ``tellnorm features`` does (:func:`tellnorm.features.contrast_table`,
:func:`tellnorm.features.reason_score`); top-activating contexts (a repeated prefix, e.g. the shared chat template,
is shown once: a causal model gives it the same activation), top input tokens, promoted / suppressed output tokens
(``W_dec[f] @ W_U``, computed in chunks of features), and the feature's activation along a few example responses.
Encoding, logit effects, the correlation and the means come from :mod:`tellnorm.apps.feature_stats`, shared with
the feature dashboards.

:func:`build_explorer_data` collects the stream into a dict; :func:`tellnorm.apps.explorer.site.write_site` writes
either form, a stream one document at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from tellnorm.apps.feature_stats import (
    LOGIT_CHUNK_ELEMENTS,
    display_tokens,
    encode_chunks,
    logit_tops,
    norm_correlation,
    sae_name,
    safe_mean,
    unembedding,
)
from tellnorm.errors import TellnormError
from tellnorm.generation import LayerHooks, run_forward

if TYPE_CHECKING:
    import torch

SCHEMA_VERSION = 2
DEFAULT_PER_DIFFICULTY = 5
N_EXAMPLES = 8
CONTEXT = (10, 3)
N_BINS = 30
N_TOP_TOKENS = 5
N_LOGITS = 8
N_STRIPS = 2  # example responses shown along a feature page
SHARD = 1024  # features per features_L<l>_<k> document: a feature page loads one shard, not a whole layer
RESIDUAL_CACHE_BYTES = 1 << 28  # keep every SAE layer's vectors from the first pass when they fit in 256 MiB
TECHNIQUES = ("alrr", "erss", "suppression")
SUPPRESSION_FACTOR = 0.1  # PAPER §4: x' = 0.1·x on high-norm tokens
MAX_NEW_TOKENS = 240  # the explorer corpus's length limit (tellnorm.apps.explorer.explorer_corpus)


def _r(x, digits: int = 4):
    """A float rounded to ``digits`` significant digits (JSON size); None for NaN/inf."""
    x = float(x)
    if not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def _rl(values, digits: int = 4) -> list:
    return [_r(v, digits) for v in np.asarray(values, dtype=np.float64).tolist()]


def check_saes(model: Any, saes: Mapping[int, object], point: str = "resid_post") -> list[int]:
    """SAEs must exist, read this model's width and sit on the layer they are keyed by; returns the layers."""
    if not saes:
        raise TellnormError("no SAEs: pass at least one layer's SAE (e.g. --saes organism)")
    for layer, sae in saes.items():
        hook = model.hook_name(int(layer), point)  # validates the layer
        d_in = int(sae.cfg.d_in)
        if d_in != model.d_model:
            raise TellnormError(f"the layer-{layer} SAE reads vectors of size d_in={d_in} but {model.name} has "
                                f"d_model={model.d_model}: use SAEs trained on this model")
        sae_hook = getattr(getattr(sae.cfg, "metadata", None), "hook_name", None)
        if sae_hook and sae_hook != hook:
            raise TellnormError(f"the SAE given for layer {layer} was trained on {sae_hook!r}, not {hook!r}: key "
                                "each SAE by the layer it reads")
    return sorted(int(l) for l in saes)


def check_feature(saes: Mapping[int, object], layer: int, feature: int) -> None:
    """The layer must have an SAE and the feature must exist in it."""
    if layer not in saes:
        raise TellnormError(f"no SAE for layer {layer}: the explorer has layers {sorted(saes)}")
    d_sae = int(saes[layer].cfg.d_sae)
    if not 0 <= int(feature) < d_sae:
        raise TellnormError(f"feature {feature} does not exist at layer {layer}: its SAE has d_sae={d_sae} "
                            f"features (ids 0..{d_sae - 1})")


def check_techniques(techniques: Sequence[str]) -> tuple[str, ...]:
    """The techniques the norm view marks: a subset of :data:`TECHNIQUES`, each once (in that order)."""
    if isinstance(techniques, str):
        techniques = [t for t in techniques.split(",") if t.strip()]
    names = tuple(str(t).strip().lower() for t in techniques)
    unknown = [t for t in names if t not in TECHNIQUES]
    if unknown:
        raise TellnormError(f"unknown technique(s) {unknown} for the norm view: choose from {', '.join(TECHNIQUES)}")
    if len(set(names)) != len(names):
        raise TellnormError(f"the norm view's techniques name one twice: {list(names)}")
    return tuple(sorted(names, key=TECHNIQUES.index))


def technique_layers(model: Any, techniques: Sequence[str], *, alrr: Any = None,
                     erss: Any = None) -> dict[str, list[int]]:
    """{technique: the layers it edits}: the configs' layers, else the model's late layers (the reference code's
    default for ALRR and ERSS, and the suppression study's late set). Validates every layer."""
    out = {}
    for name in techniques:
        cfg = {"alrr": alrr, "erss": erss}.get(name)
        layers = list(cfg.layers) if cfg is not None and cfg.layers is not None else list(model.late_layers())
        for layer in layers:
            model.hook_name(int(layer))
        out[name] = sorted(int(l) for l in layers)
    return out


class SparseActivationObserver(LayerHooks):
    """‖h‖₂ of every eligible token at ``layers`` (default: the SAEs' layers); at each layer with an SAE in
    ``saes`` the non-zero SAE activations (token, feature, value); at each layer in ``keep`` the vectors themselves
    (on the CPU, for encoding later without another pass: :meth:`encode`)."""

    def __init__(self, model: Any, saes: Mapping[int, object], offsets: Sequence[int], n_total: int, *,
                 layers: Sequence[int] | None = None, keep: Sequence[int] = (), encode_chunk: int = 1024):
        super().__init__(model, sorted(set(layers) if layers is not None else set(saes)))
        self.saes = dict(saes)
        missing = [l for l in [*self.saes, *keep] if l not in self.layers]
        if missing:
            raise TellnormError(f"layer(s) {missing} are not among the observed layers {self.layers}")
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.norms = {l: np.full(n_total, np.nan, dtype=np.float64) for l in self.layers}
        self.entries = {l: [] for l in self.saes}  # list of (token, feature, value) arrays
        self.kept = {int(l): [] for l in keep}  # list of (token, vectors) pairs
        self.encode_chunk = encode_chunk

    def hook_for(self, layer: int) -> Callable:
        """The hook recording ‖h‖₂ (and the kept vectors, the SAE activations) at ``layer``."""
        import torch

        def hook(activation, hook):
            info = self.info
            with torch.no_grad():
                eligible = info.valid.cpu() & (info.positions.cpu() > 0)
                rows, cols = eligible.nonzero(as_tuple=True)
                rids = np.asarray([info.request_ids[r] for r in rows.tolist()], dtype=np.int64)
                gidx = self.offsets[rids] + info.positions.cpu()[rows, cols].numpy() if len(rids) else rids
                h = activation.detach()[rows.to(activation.device), cols.to(activation.device)]
                self.norms[layer][gidx] = h.double().norm(dim=-1).cpu().numpy()
                if layer in self.kept:
                    self.kept[layer].append((gidx, h.cpu()))
                if layer in self.saes:
                    self.encode(layer, self.saes[layer], gidx, h)
            return activation
        return hook

    def encode(self, layer: int, sae: Any, gidx: np.ndarray, h: torch.Tensor) -> None:
        """Encode the vectors ``h`` of tokens ``gidx`` with ``sae``; keep the non-zero activations."""
        import torch

        with torch.no_grad():
            for i, acts in encode_chunks(sae, h, self.encode_chunk):
                if not torch.isfinite(acts).all():
                    raise TellnormError(f"non-finite SAE output at layer {layer}: check the SAE's dtype and weights")
                t, f = (acts > 0).nonzero(as_tuple=True)
                self.entries.setdefault(layer, []).append((gidx[i + t.numpy()], f.numpy().astype(np.int32),
                                                           acts[t, f].numpy().astype(np.float32)))

    def layer_entries(self, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(token, feature, value)`` arrays of the layer's non-zero SAE activations, concatenated."""
        parts = self.entries.get(layer, [])
        if not parts:
            return np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32)
        return tuple(np.concatenate([p[k] for p in parts]) for k in range(3))


def _feature_stats(tok, feat, val, norms, eligible, d_sae, think_mask, nothink_mask, scale):
    """Vectorised per-feature statistics of one layer from its sparse entries (module docstring)."""
    n = int(eligible.sum())
    v = val.astype(np.float64)
    n_active = np.bincount(feat, minlength=d_sae)
    s = np.bincount(feat, weights=v, minlength=d_sae)
    ss = np.bincount(feat, weights=v * v, minlength=d_sae)
    vmax = np.zeros(d_sae)
    np.maximum.at(vmax, feat, v)
    y = norms[eligible]
    y_mean = float(y.mean()) if n else float("nan")
    yc = norms - y_mean
    sxy = np.bincount(feat, weights=v * yc[tok], minlength=d_sae)
    var_x = ss / n - (s / n) ** 2 if n else np.zeros(d_sae)
    var_y = float((yc[eligible] ** 2).mean()) if n else 0.0
    corr = norm_correlation(sxy / max(n, 1), var_x, var_y)  # NaN everywhere when n == 0 (no variance)
    norm_active = safe_mean(np.bincount(feat, weights=norms[tok], minlength=d_sae), n_active)
    mean_active = safe_mean(s, n_active)

    def bucket_mean(mask):
        count = int(mask.sum())
        if count == 0:
            return None
        return np.bincount(feat[mask[tok]], weights=v[mask[tok]], minlength=d_sae) / count * scale

    mu_t, mu_n = bucket_mean(think_mask), bucket_mean(nothink_mask)
    if mu_t is not None and mu_n is not None:
        from tellnorm.features import RELATIVE_EPS

        delta = mu_t - mu_n
        rel = delta / (mu_n + RELATIVE_EPS)
    else:
        delta = rel = np.full(d_sae, np.nan)
    return {"n_tokens": n, "n_active": n_active, "density": n_active / max(n, 1), "mean": s / max(n, 1),
            "mean_active": mean_active, "max": vmax, "corr": corr, "norm_active": norm_active,
            "delta": delta, "relative_delta": rel, "mean_thinking": mu_t, "mean_non_thinking": mu_n,
            "bucket_mean": bucket_mean}


def _reason_vocab(model):
    import warnings

    from tellnorm import features as F

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # words the tokenizer cannot encode are skipped (features.py says so)
        try:
            return F.vocabulary_token_ids(model.tokenizer, F.REASON_SCORE_GROUPS)
        except TellnormError:
            return None


def _reason_masks(model, corpus, tok_of):
    """ReasonScore's token buckets (P, N, one per word group) as masks over the corpus's tokens; the same for
    every layer, so built once. None when the tokenizer has no reasoning words."""
    from tellnorm import features as F

    vocab = _reason_vocab(model)
    if vocab is None:
        return None
    ignore = {model.tokenizer.pad_token_id, model.tokenizer.eos_token_id}
    thinking = corpus.thinking
    masks = F.reason_score_masks([corpus.sequences[i] for i in thinking], vocab, ignore_ids=ignore,
                                 start=[corpus.n_prompt[i] for i in thinking])
    buckets = {}
    for j, i in enumerate(thinking):
        for name, m in masks[j].items():
            idx = tok_of(i, np.flatnonzero(np.asarray(m, dtype=bool)))
            buckets.setdefault(name, []).append(idx)
    out = {}
    for name, parts in buckets.items():
        mask = np.zeros(tok_of.total, dtype=bool)
        mask[np.concatenate(parts)] = True
        out[name] = mask
    return {"groups": list(vocab), "masks": out}


def _reason_scores(reason, bucket_mean):
    """ReasonScore per feature (None where no reasoning word occurs in the corpus)."""
    import torch

    from tellnorm import features as F

    if reason is None:
        return None
    means = {name: bucket_mean(mask) for name, mask in reason["masks"].items()}
    groups = [g for g in reason["groups"] if means.get(f"group:{g}") is not None]
    if not groups or means.get("P") is None or means.get("N") is None:
        return None
    score, _ = F.reason_score(torch.from_numpy(means["P"]), torch.from_numpy(means["N"]),
                              torch.stack([torch.from_numpy(means[f"group:{g}"]) for g in groups]))
    return score.numpy()


class _TokenIndex:
    def __init__(self, offsets, total):
        self.offsets, self.total = offsets, total

    def __call__(self, seq, positions):
        return self.offsets[seq] + np.asarray(positions, dtype=np.int64)


def _prefix_ids(sequences) -> np.ndarray:
    """An id per (sequence, position) that is equal exactly when the token prefixes up to it are equal."""
    trie: dict = {}
    out = []
    for seq in sequences:
        node = 0
        for t in seq:
            node = trie.setdefault((node, int(t)), len(trie) + 1)
            out.append(node)
    return np.asarray(out, dtype=np.int64)


@dataclass
class _Corpus:
    """The corpus's tokens, flattened once: what every layer's computation shares."""

    sequences: list
    lengths: np.ndarray
    offsets: np.ndarray
    total: int
    tok_of: _TokenIndex
    seq_of: np.ndarray
    pos_of: np.ndarray
    eligible: np.ndarray
    generated: np.ndarray
    think_mask: np.ndarray
    nothink_mask: np.ndarray
    prefix: np.ndarray
    display: list
    flat_tokens: list
    chosen: list
    chosen_pos: dict
    n_prompt: list


def _flatten(model, corpus, difficulties) -> _Corpus:
    sequences = [list(map(int, s)) for s in corpus.sequences]
    lengths = np.asarray([len(s) for s in sequences], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    total = int(lengths.sum())
    seq_of = np.repeat(np.arange(len(sequences)), lengths)
    pos_of = np.arange(total) - offsets[seq_of]
    eligible = pos_of > 0
    n_prompt = np.asarray(corpus.n_prompt, dtype=np.int64)
    generated = pos_of >= n_prompt[seq_of]
    modes = np.asarray(corpus.modes)
    display = [display_tokens(model, s) for s in sequences]  # display text of every token once
    # Norm view: per difficulty and mode, the first response.
    chosen, seen = [], set()
    for i, (d, m) in enumerate(zip(difficulties, corpus.modes)):
        if (d, m) not in seen:
            seen.add((d, m))
            chosen.append(i)
    chosen.sort(key=lambda i: (difficulties[i] if difficulties[i] is not None else -1, corpus.modes[i] != "thinking"))
    return _Corpus(sequences, lengths, offsets, total, _TokenIndex(offsets, total), seq_of, pos_of, eligible, generated,
                   generated & eligible & (modes[seq_of] == "thinking"),
                   generated & eligible & (modes[seq_of] == "non-thinking"), _prefix_ids(sequences), display,
                   [t for d in display for t in d], chosen, {i: k for k, i in enumerate(chosen)},
                   [int(x) for x in corpus.n_prompt])


def _forward(model, c: _Corpus, observer, saes, batch_size: int) -> None:
    """One teacher-forced pass over the corpus with ``observer`` (its SAEs in eval mode meanwhile)."""
    import torch

    was = {l: s.training for l, s in saes.items()}
    for s in saes.values():
        s.eval()
    try:
        with torch.no_grad():
            run_forward(model, c.sequences, batch_size=batch_size, observers=[observer], n_prompt=c.n_prompt)
    finally:
        for l, s in saes.items():
            s.train(was[l])


@dataclass(frozen=True)
class _Options:
    n_examples: int
    context: tuple
    n_bins: int
    n_top_tokens: int
    n_logits: int
    shard: int
    batch_size: int


def _layer_activations(model, layer: int, sae, c: _Corpus, kept, norms, batch_size: int):
    """(token, feature, value) of the layer's non-zero SAE activations and ‖h‖₂ per token: encoded from the
    vectors the first pass kept (``kept``), else from a pass of the model with this layer's SAE only."""
    observer = SparseActivationObserver(model, {layer: sae}, c.offsets, c.total)
    if kept is None:
        _forward(model, c, observer, {layer: sae}, batch_size)
        norms = observer.norms[layer]
    else:
        was = sae.training
        sae.eval()
        try:
            for gidx, h in kept:
                observer.encode(layer, sae, gidx, h)
        finally:
            sae.train(was)
    return (*observer.layer_entries(layer), norms)


def _layer_docs(model, layer: int, sae, c: _Corpus, reason, W_U, threshold, opt: _Options, *, kept=None,
                norms=None):
    """The documents of one layer (its own SAE only); yields them and returns its meta entry.

    Everything computed here is local to this call: when the caller moves on to the next layer, nothing of this
    one is left in memory."""
    import torch

    d_sae = int(sae.cfg.d_sae)
    tok, feat, val, norms = _layer_activations(model, layer, sae, c, kept, norms, opt.batch_size)
    del kept
    with torch.no_grad():
        scale = sae.W_dec.detach().float().norm(dim=-1).cpu().numpy().astype(np.float64)
    st = _feature_stats(tok, feat, val, norms, c.eligible, d_sae, c.think_mask, c.nothink_mask, scale)
    rs = _reason_scores(reason, st["bucket_mean"])
    seq_of, pos_of, offsets, lengths = c.seq_of, c.pos_of, c.offsets, c.lengths

    # Top examples, a repeated prefix kept once (same prefix, same activation in a causal model).
    key = feat.astype(np.int64) * (int(c.prefix.max()) + 1) + c.prefix[tok]
    _, first = np.unique(key, return_index=True)
    dt, df, dv = tok[first], feat[first], val[first]
    order = np.lexsort((-dv, df))
    dt, df, dv = dt[order], df[order], dv[order]
    starts = np.searchsorted(df, np.arange(d_sae))
    rank = np.arange(len(df)) - starts[df]
    keep = rank < max(opt.n_examples, 20)
    dt, df, dv = dt[keep], df[keep], dv[keep]

    # Activation lookup for context windows: sorted keys token * d_sae + feature.
    lookup_key = tok.astype(np.int64) * d_sae + feat
    sort = np.argsort(lookup_key)
    lookup_key, lookup_val = lookup_key[sort], val[sort]

    def activation_at(tokens, f):
        k = np.asarray(tokens, dtype=np.int64) * d_sae + f
        i = np.clip(np.searchsorted(lookup_key, k), 0, max(len(lookup_key) - 1, 0))
        hit = (lookup_key[i] == k) if len(lookup_key) else np.zeros(len(k), bool)
        return np.where(hit, lookup_val[i] if len(lookup_val) else 0.0, 0.0)

    up_i, up_v, down_i, down_v = logit_tops(sae.W_dec, W_U, opt.n_logits, chunk_elements=LOGIT_CHUNK_ELEMENTS)
    vocab_ids = np.unique(np.concatenate([up_i.ravel(), down_i.ravel()])).tolist()
    vocab_text = dict(zip(vocab_ids, display_tokens(model, vocab_ids)))

    # Example-response strips: entries on the norm view's responses.
    on_chosen = np.isin(seq_of[tok], c.chosen)
    ct, cf, cv = tok[on_chosen], feat[on_chosen], val[on_chosen]
    by_f = np.argsort(cf, kind="stable")
    ct, cf, cv = ct[by_f], cf[by_f], cv[by_f]
    all_by_f = np.argsort(feat, kind="stable")
    feat_sorted, val_by_f = feat[all_by_f], val[all_by_f]
    del tok, feat, val, sort, all_by_f

    rows = {"id": list(range(d_sae)), "density": _rl(st["density"]), "mean": _rl(st["mean"]),
            "mean_active": _rl(st["mean_active"]), "max": _rl(st["max"]), "delta": _rl(st["delta"]),
            "relative_delta": _rl(st["relative_delta"]),
            "reason_score": _rl(rs) if rs is not None else [None] * d_sae,
            "corr": _rl(st["corr"], 3), "top_tokens": []}
    context = opt.context
    details = []
    for f in range(d_sae):
        lo, hi = np.searchsorted(df, f), np.searchsorted(df, f, side="right")
        cand_t = dt[lo:hi]
        tops = []
        for t in cand_t:
            text = c.flat_tokens[t]
            if text not in tops:
                tops.append(text)
            if len(tops) == opt.n_top_tokens:
                break
        rows["top_tokens"].append(tops)
        examples = []
        for t, v in zip(cand_t[:opt.n_examples], dv[lo:hi][:opt.n_examples]):
            s, p = int(seq_of[t]), int(pos_of[t])
            a, b = max(p - context[0], 0), min(p + context[1] + 1, int(lengths[s]))
            acts = activation_at(np.arange(offsets[s] + a, offsets[s] + b), f)
            examples.append({"seq": s, "pos": p, "start": a, "act": _r(v),
                             "acts": [None if a + i == 0 else _r(x, 3) for i, x in enumerate(acts.tolist())]})
        # histogram of positive activations, n_bins equal bins on [0, max]
        fv = val_by_f[np.searchsorted(feat_sorted, f):np.searchsorted(feat_sorted, f, side="right")]
        hist = None
        if len(fv):
            counts, edges = np.histogram(fv, bins=opt.n_bins, range=(0.0, float(fv.max())))
            hist = {"edges": _rl(edges), "counts": counts.tolist(), "n_zero": int(st["n_tokens"] - len(fv))}
        strips = []
        a0, a1 = np.searchsorted(cf, f), np.searchsorted(cf, f, side="right")
        if a1 > a0:
            per_seq = {}
            for t, v in zip(ct[a0:a1].tolist(), cv[a0:a1].tolist()):
                per_seq.setdefault(int(seq_of[t]), []).append([int(pos_of[t]), _r(v, 3)])
            best = sorted(per_seq, key=lambda s: -max(v for _, v in per_seq[s]))[:N_STRIPS]
            strips = [{"response": c.chosen_pos[s], "seq": s, "acts": per_seq[s]} for s in best]
        details.append({
            "id": f, "examples": examples, "histogram": hist,
            "promoted": [[vocab_text[int(i)], _r(x)] for i, x in zip(up_i[f], up_v[f])],
            "suppressed": [[vocab_text[int(i)], _r(x)] for i, x in zip(down_i[f], down_v[f])],
            "norm_active": _r(st["norm_active"][f]), "n_active": int(st["n_active"][f]), "strips": strips,
        })
        if len(details) == opt.shard or f == d_sae - 1:
            k = f // opt.shard
            yield f"features_L{layer}_{k}", {"layer": layer, "shard": k, "start": k * opt.shard, "features": details}
            details = []
    yield f"index_L{layer}", {"layer": layer, "d_sae": d_sae, "hook_name": model.hook_name(layer),
                              "n_tokens": st["n_tokens"], "shard": opt.shard, "features": rows}
    return {"layer": layer, "d_sae": d_sae, "sae": sae_name(sae),
            "threshold": _r(threshold) if threshold is not None else None, "reason_score": rs is not None,
            "n_shards": -(-d_sae // opt.shard)}


TECHNIQUE_LABELS = {"alrr": "ALRR", "erss": "ERSS", "suppression": "high-norm suppression"}
MARK_KINDS = {"alrr": ("kept", "tried"), "erss": ("injected",), "suppression": ("scaled",)}


def _settings(cfg) -> dict:
    from dataclasses import asdict

    return {k: v for k, v in asdict(cfg).items() if k != "layers" and v is not None}


def technique_edit(model: Any, name: str, layers: Sequence[int], thresholds: Mapping[int, float], *,
                   alrr: Any = None, erss: Any = None, suppression_factor: float = SUPPRESSION_FACTOR) -> Any:
    """A fresh edit of technique ``name`` at ``layers`` with the fixed per-layer τ ``thresholds``, built as
    ``tellnorm evaluate`` (ALRR, ERSS) and the suppression study (``Scale`` on AboveThreshold tokens) build them."""
    from dataclasses import replace

    from tellnorm.interventions import AboveThreshold, Scale
    from tellnorm.techniques import ALRRConfig, ERSSConfig, build_edits

    fixed = {int(l): float(thresholds[l]) for l in layers}
    if name == "suppression":
        return Scale(model, list(layers), suppression_factor, selection=AboveThreshold("fixed", fixed=fixed),
                     name="suppression")
    cfg = {"alrr": alrr or ALRRConfig(), "erss": erss or ERSSConfig()}[name]
    cfg = replace(cfg, layers=tuple(layers))
    return build_edits((name,), model, threshold_mode="calibrated", fixed=fixed,
                       **{name: cfg})[0]


def edit_marks(edit: Any, name: str) -> dict:
    """{request id: ``[[position, layer, kind, passes], ...]``} from the edit's own record (``EditRecord.frame()``:
    the ``edited`` tokens); ALRR's kind from its per-position state: "kept" (``passes`` extra passes kept) or
    "tried" (an extra pass ran and was rejected)."""
    frame = edit.record.frame()
    frame = frame[frame.edited].sort_values(["position", "layer"], kind="stable")
    out: dict = {}
    for rid, layer, position in zip(frame.request_id.tolist(), frame.layer.tolist(), frame.position.tolist()):
        layer, position = int(layer), int(position)
        if name == "alrr":
            kept = int(edit.state(rid, layer)["kept"].get(position, 0))
            out.setdefault(rid, []).append([position, layer, "kept" if kept else "tried", kept])
        else:
            out.setdefault(rid, []).append([position, layer, MARK_KINDS[name][0], None])
    return out


def technique_runs(model: Any, c: _Corpus, thresholds: Mapping[int, float], techniques: Sequence[str],
                   layers: Mapping[str, Sequence[int]], *, alrr: Any = None, erss: Any = None,
                   suppression_factor: float = SUPPRESSION_FACTOR, max_new_tokens: int = MAX_NEW_TOKENS,
                   progress: bool = False) -> dict:
    """The ``techniques`` document: the norm view's prompts decoded greedily under each technique (one run each,
    one batch, request id = the corpus index) and where it acted, from its :class:`EditRecord`."""
    from tellnorm.generation import SamplingConfig, generate

    rids = list(c.chosen)
    prompts = [c.sequences[i][:c.n_prompt[i]] for i in rids]
    entries = []
    for name in techniques:
        entry = {"key": name, "label": TECHNIQUE_LABELS[name], "layers": list(layers[name]), "error": None,
                 "runs": [], "counts": {k: 0 for k in MARK_KINDS[name]}}
        try:
            edit = technique_edit(model, name, layers[name], thresholds, alrr=alrr, erss=erss,
                                  suppression_factor=suppression_factor)
        except TellnormError as e:  # e.g. ALRR's extra pass on an architecture it cannot re-run
            entry["error"] = str(e)
            entries.append(entry)
            continue
        entry["settings"] = ({"factor": suppression_factor} if name == "suppression" else _settings(edit.cfg))
        if not rids:
            entries.append(entry)
            continue
        gens = generate(model, prompts, SamplingConfig(max_new_tokens=max_new_tokens), request_ids=rids,
                        batch_size=50, observers=[edit], progress=progress, desc=f"explorer: {name}")
        marks_of = edit_marks(edit, name)
        for i, g in zip(rids, gens):
            ids, plain = list(g.ids), c.sequences[i]
            diff = next((p for p, (a, b) in enumerate(zip(ids, plain)) if a != b), None)
            if diff is None and len(ids) != len(plain):
                diff = min(len(ids), len(plain))
            marks = marks_of.get(i, [])
            for m in marks:
                entry["counts"][m[2]] += 1
            entry["runs"].append({"seq": i, "n_prompt": len(g.prompt_ids), "same": diff is None, "first_diff": diff,
                                  "finish": g.finish_reason, "tokens": display_tokens(model, g.generated_ids),
                                  "marks": marks})
        entries.append(entry)
    return {"thresholds": {str(l): float(t) for l, t in sorted(thresholds.items())},
            "max_new_tokens": max_new_tokens, "decoding": "greedy", "techniques": entries}


def iter_explorer_docs(model: Any, saes: Mapping[int, object], corpus: Any, *,
                       difficulties: Sequence[int] | None = None,
                       n_examples: int = N_EXAMPLES, context: tuple[int, int] = CONTEXT, n_bins: int = N_BINS,
                       n_top_tokens: int = N_TOP_TOKENS, n_logits: int = N_LOGITS, batch_size: int = 16,
                       threshold_cfg: Any = None, techniques: Sequence[str] = TECHNIQUES, alrr: Any = None,
                       erss: Any = None, suppression_factor: float = SUPPRESSION_FACTOR,
                       max_new_tokens: int = MAX_NEW_TOKENS, shard: int = SHARD,
                       residual_cache_bytes: int = RESIDUAL_CACHE_BYTES,
                       progress: bool = False) -> Iterator[tuple[str, dict]]:
    """The explorer's documents as ``(name, doc)`` pairs, one SAE layer at a time (module docstring).

    ``difficulties[i]``: difficulty of sequence i (None: unknown, shown as "—"); the norm view shows, per difficulty
    and mode, the first response. ``techniques``: which of ALRR, ERSS and high-norm suppression to run on the norm
    view's prompts (``()``: none). ``residual_cache_bytes``: when every SAE layer's vectors of the corpus fit in
    it, the first pass keeps them (CPU) and each layer is encoded from them; otherwise each layer gets its own pass
    of the model. Either way the statistics and documents are computed one layer at a time. Every argument is
    checked before the first pass."""
    from tellnorm.thresholds import calibrated_thresholds

    layers = check_saes(model, saes)
    techniques = check_techniques(techniques)
    tech_layers = technique_layers(model, techniques, alrr=alrr, erss=erss)
    if not (isinstance(residual_cache_bytes, int) and residual_cache_bytes >= 0):
        raise TellnormError(f"residual_cache_bytes must be a whole number ≥ 0, got {residual_cache_bytes!r}")
    if not (isinstance(shard, int) and shard >= 1):
        raise TellnormError(f"shard must be a whole number of features ≥ 1, got {shard!r}")
    if "suppression" in techniques:
        from tellnorm.interventions.edits import check_factor

        check_factor(suppression_factor, "suppression factor")
    if not corpus.sequences:
        raise TellnormError("the contrast corpus is empty: nothing to explore")
    n = len(corpus.sequences)
    difficulties = list(difficulties) if difficulties is not None else [None] * n
    if len(difficulties) != n:
        raise TellnormError(f"{len(difficulties)} difficulties for {n} sequences: give one each")
    c = _flatten(model, corpus, difficulties)

    # 1. ‖h‖₂ at every SAE and technique layer (cheap: no SAE), τ per layer, the corpus and the norm view.
    norm_layers = sorted(set(layers) | {l for ls in tech_layers.values() for l in ls})
    cache = 4 * int(c.eligible.sum()) * int(model.d_model) * len(layers) <= residual_cache_bytes
    observer = SparseActivationObserver(model, {}, c.offsets, c.total, layers=norm_layers,
                                        keep=layers if cache else ())
    _forward(model, c, observer, {}, batch_size)
    norms, kept = observer.norms, observer.kept
    del observer
    fixed = calibrated_thresholds({l: norms[l][c.generated & c.eligible] for l in norm_layers}, threshold_cfg).values
    yield "corpus", {"tokens": c.display, "modes": list(corpus.modes), "n_prompt": c.n_prompt,
                     "difficulties": difficulties}
    labels = getattr(corpus, "labels", None) or [None] * n
    yield "norms", {"layers": norm_layers, "sae_layers": layers,
                    "thresholds": {str(l): _r(fixed[l]) for l in norm_layers},
                    "responses": [{"seq": i, "mode": corpus.modes[i], "difficulty": difficulties[i],
                                   "n_prompt": c.n_prompt[i], "labels": [x if x else None for x in (labels[i] or [])],
                                   "norms": {str(l): _rl(norms[l][c.offsets[i]:c.offsets[i] + c.lengths[i]])
                                             for l in norm_layers}} for i in c.chosen]}

    # 2. The techniques on the norm view's prompts, with the same τ.
    yield "techniques", technique_runs(model, c, {l: fixed[l] for ls in tech_layers.values() for l in ls},
                                       techniques, tech_layers, alrr=alrr, erss=erss,
                                       suppression_factor=suppression_factor, max_new_tokens=max_new_tokens,
                                       progress=progress)

    # 3. One layer at a time: its pass, its statistics, its documents.
    W_U = unembedding(model)  # [d_model, vocab]
    reason = _reason_masks(model, corpus, c.tok_of)
    opt = _Options(n_examples, tuple(context), n_bins, n_top_tokens, n_logits, shard, batch_size)
    index_meta = []
    steps = layers
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(layers, desc="explorer layers", unit="layer")
    for layer in steps:
        entry = yield from _layer_docs(model, layer, saes[layer], c, reason, W_U, fixed.get(layer), opt,
                                       kept=kept.pop(layer, None), norms=norms[layer])
        index_meta.append(entry)

    # 4. meta last: it lists every layer.
    yield "meta", {"version": SCHEMA_VERSION, "model": str(model.name), "layers": index_meta, "shard": shard,
                   "n_sequences": n, "n_tokens": int(c.eligible.sum()),
                   "n_thinking_tokens": int(c.think_mask.sum()), "n_non_thinking_tokens": int(c.nothink_mask.sum()),
                   "organism": getattr(model, "source", None) == "organism", "context": list(context),
                   "n_examples": n_examples, "techniques": list(techniques)}


def build_explorer_data(model: Any, saes: Mapping[int, object], corpus: Any, **kwargs: Any) -> dict[str, dict]:
    """Every document of :func:`iter_explorer_docs` in one dict (small suites and tests; a large suite is written
    as a stream: ``write_site(iter_explorer_docs(...), out)``)."""
    return dict(iter_explorer_docs(model, saes, corpus, **kwargs))
