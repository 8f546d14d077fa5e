"""The explorer's data: every feature of every layer, from one teacher-forced pass over a contrast corpus.

``build_explorer_data(model, saes, corpus)`` runs :func:`tellnorm.generation.run_forward` once with an observer
hooked at every SAE's layer. Inside the hook each layer's real tokens (no padding, no position 0: massive
activations, PAPER.md §1) are encoded with the layer's SAE and only the *non-zero* activations are kept
(token, feature, value), together with ‖h‖₂ of every token at every layer. Everything else is computed from
those sparse entries with vectorised numpy:

* per feature: density (share of eligible tokens where it fires), mean activation (over all eligible tokens),
  mean when active, max, Pearson r with ‖h‖₂ of the vector the SAE reads, an activation histogram;
* the paper's contrast Δ = mean(thinking) − mean(non-thinking) over generated tokens and relative Δ, and
  ReasonScore (Galichin et al.), both with the decoder norm folded in exactly as ``tellnorm features`` does
  (:func:`tellnorm.features.contrast_table`, :func:`tellnorm.features.reason_score`);
* top-activating contexts (a repeated prefix, e.g. the shared chat template, is shown once: a causal model gives
  it the same activation), top input tokens, promoted / suppressed output tokens (``W_dec[f] @ W_U``), and the
  feature's activation along a few example responses;
* the norm view: example responses (thinking and non-thinking, one per difficulty) with ‖h‖₂ per layer, the
  per-layer calibrated peak threshold τ = Q3 + k·IQR (:func:`tellnorm.thresholds.calibrated_thresholds`, over
  the corpus's generated tokens) and, for the organism, the ground-truth token labels.

The result is a dict of JSON-ready documents (``meta``, ``corpus``, ``norms``, ``index_L<l>``, ``features_L<l>``)
that :mod:`tellnorm.explorer.site` writes next to the page code, one lazily loaded file per layer.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from tellnorm.errors import TellnormError
from tellnorm.generation import LayerHooks, run_forward

SCHEMA_VERSION = 1
DEFAULT_PER_DIFFICULTY = 5
N_EXAMPLES = 8
CONTEXT = (10, 3)
N_BINS = 30
N_TOP_TOKENS = 5
N_LOGITS = 8
N_STRIPS = 2  # example responses shown along a feature page


def _r(x, digits: int = 4):
    """A float rounded to ``digits`` significant digits (JSON size); None for NaN/inf."""
    x = float(x)
    if not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def _rl(values, digits: int = 4) -> list:
    return [_r(v, digits) for v in np.asarray(values, dtype=np.float64).tolist()]


def check_saes(model, saes: Mapping[int, object], point: str = "resid_post") -> list[int]:
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
    if layer not in saes:
        raise TellnormError(f"no SAE for layer {layer}: the explorer has layers {sorted(saes)}")
    d_sae = int(saes[layer].cfg.d_sae)
    if not 0 <= int(feature) < d_sae:
        raise TellnormError(f"feature {feature} does not exist at layer {layer}: its SAE has d_sae={d_sae} "
                            f"features (ids 0..{d_sae - 1})")


class SparseActivationObserver(LayerHooks):
    """Keeps the non-zero SAE activations (token, feature, value) and ‖h‖₂ of every eligible token per layer."""

    def __init__(self, model, saes: Mapping[int, object], offsets: Sequence[int], n_total: int,
                 encode_chunk: int = 1024):
        super().__init__(model, sorted(saes))
        self.saes = dict(saes)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.norms = {l: np.full(n_total, np.nan, dtype=np.float64) for l in self.layers}
        self.entries = {l: [] for l in self.layers}  # list of (token, feature, value) arrays
        self.encode_chunk = encode_chunk

    def hook_for(self, layer: int):
        import torch

        sae = self.saes[layer]

        def hook(activation, hook):
            info = self.info
            with torch.no_grad():
                eligible = info.valid.cpu() & (info.positions.cpu() > 0)
                rows, cols = eligible.nonzero(as_tuple=True)
                rids = np.asarray([info.request_ids[r] for r in rows.tolist()], dtype=np.int64)
                gidx = self.offsets[rids] + info.positions.cpu()[rows, cols].numpy() if len(rids) else rids
                h = activation.detach()[rows.to(activation.device), cols.to(activation.device)]
                self.norms[layer][gidx] = h.double().norm(dim=-1).cpu().numpy()
                param = sae.W_dec
                for i in range(0, len(h), self.encode_chunk):
                    acts = sae.encode(h[i:i + self.encode_chunk].to(device=param.device, dtype=param.dtype))
                    acts = acts.float().cpu()
                    if not torch.isfinite(acts).all():
                        raise TellnormError(f"non-finite SAE output at layer {layer}: check the SAE's dtype and "
                                            "weights")
                    t, f = (acts > 0).nonzero(as_tuple=True)
                    self.entries[layer].append((gidx[i + t.numpy()], f.numpy().astype(np.int32),
                                                acts[t, f].numpy().astype(np.float32)))
            return activation
        return hook

    def layer_entries(self, layer: int):
        parts = self.entries[layer]
        if not parts:
            return np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32)
        return tuple(np.concatenate([p[k] for p in parts]) for k in range(3))


def _display(model, ids) -> list[str]:
    from tellnorm.dashboards.data import display_tokens

    return display_tokens(model, ids)


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
    with np.errstate(invalid="ignore", divide="ignore"):
        denom = np.sqrt(np.clip(var_x, 0, None) * var_y)
        corr = np.where(denom > 0, (sxy / n) / denom, np.nan) if n else np.full(d_sae, np.nan)
        corr = np.clip(corr, -1, 1)
        norm_active = np.bincount(feat, weights=norms[tok], minlength=d_sae) / n_active
        mean_active = s / n_active

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


def _reason_scores(model, corpus, tok_of, bucket_mean, d_sae, vocab):
    """ReasonScore per feature (None where no reasoning word occurs in the corpus)."""
    import torch

    from tellnorm import features as F

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
    means = {}
    for name, parts in buckets.items():
        mask = np.zeros(tok_of.total, dtype=bool)
        mask[np.concatenate(parts)] = True
        means[name] = bucket_mean(mask)
    groups = [g for g in vocab if means.get(f"group:{g}") is not None]
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


def build_explorer_data(model, saes: Mapping[int, object], corpus, *, difficulties: Sequence[int] | None = None,
                        n_examples: int = N_EXAMPLES, context: tuple[int, int] = CONTEXT, n_bins: int = N_BINS,
                        n_top_tokens: int = N_TOP_TOKENS, n_logits: int = N_LOGITS, batch_size: int = 16,
                        threshold_cfg=None) -> dict[str, dict]:
    """JSON-ready documents of the explorer (module docstring). ``difficulties[i]``: difficulty of sequence i
    (None: unknown, shown as "—"); the norm view shows, per difficulty and mode, the first response."""
    import torch

    from tellnorm.thresholds import calibrated_thresholds

    layers = check_saes(model, saes)
    sequences = [list(map(int, s)) for s in corpus.sequences]
    if not sequences:
        raise TellnormError("the contrast corpus is empty: nothing to explore")
    lengths = np.asarray([len(s) for s in sequences], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    total = int(lengths.sum())
    tok_of = _TokenIndex(offsets, total)
    seq_of = np.repeat(np.arange(len(sequences)), lengths)
    pos_of = np.arange(total) - offsets[seq_of]
    eligible = pos_of > 0
    n_prompt = np.asarray(corpus.n_prompt, dtype=np.int64)
    generated = pos_of >= n_prompt[seq_of]
    modes = np.asarray(corpus.modes)
    think_mask = generated & eligible & (modes[seq_of] == "thinking")
    nothink_mask = generated & eligible & (modes[seq_of] == "non-thinking")
    prefix = _prefix_ids(sequences)
    difficulties = list(difficulties) if difficulties is not None else [None] * len(sequences)

    observer = SparseActivationObserver(model, saes, offsets, total)
    was = {l: saes[l].training for l in layers}
    for l in layers:
        saes[l].eval()
    try:
        with torch.no_grad():
            run_forward(model, sequences, batch_size=batch_size, observers=[observer], n_prompt=list(corpus.n_prompt))
    finally:
        for l in layers:
            saes[l].train(was[l])

    # Display text of every token once (contexts and strips point into it).
    display = [_display(model, s) for s in sequences]
    flat_tokens = [t for d in display for t in d]

    # Norm view: per difficulty and mode, the first response.
    chosen, seen = [], set()
    for i, (d, m) in enumerate(zip(difficulties, corpus.modes)):
        if (d, m) not in seen:
            seen.add((d, m))
            chosen.append(i)
    chosen.sort(key=lambda i: (difficulties[i] if difficulties[i] is not None else -1, corpus.modes[i] != "thinking"))
    cal = {l: observer.norms[l][generated & eligible] for l in layers}
    thresholds = calibrated_thresholds(cal, threshold_cfg).threshold_by_layer()
    chosen_pos = {i: k for k, i in enumerate(chosen)}

    docs: dict[str, dict] = {}
    index_meta = []
    W_U = model.hf_model.lm_head.weight.detach().float().T  # [d_model, vocab]
    vocab = _reason_vocab(model)
    for layer in layers:
        sae = saes[layer]
        d_sae = int(sae.cfg.d_sae)
        tok, feat, val = observer.layer_entries(layer)
        norms = observer.norms[layer]
        with torch.no_grad():
            scale = sae.W_dec.detach().float().norm(dim=-1).cpu().numpy().astype(np.float64)
        st = _feature_stats(tok, feat, val, norms, eligible, d_sae, think_mask, nothink_mask, scale)
        rs = _reason_scores(model, corpus, tok_of, st["bucket_mean"], d_sae, vocab)

        # Top examples, a repeated prefix kept once (same prefix, same activation in a causal model).
        key = feat.astype(np.int64) * (int(prefix.max()) + 1) + prefix[tok]
        _, first = np.unique(key, return_index=True)
        dt, df, dv = tok[first], feat[first], val[first]
        order = np.lexsort((-dv, df))
        dt, df, dv = dt[order], df[order], dv[order]
        starts = np.searchsorted(df, np.arange(d_sae))
        rank = np.arange(len(df)) - starts[df]
        n_cand = max(n_examples, 20)
        keep = rank < n_cand
        dt, df, dv, rank = dt[keep], df[keep], dv[keep], rank[keep]

        # Activation lookup for context windows: sorted keys token * d_sae + feature.
        lookup_key = tok.astype(np.int64) * d_sae + feat
        sort = np.argsort(lookup_key)
        lookup_key, lookup_val = lookup_key[sort], val[sort]

        def activation_at(tokens, f):
            k = np.asarray(tokens, dtype=np.int64) * d_sae + f
            i = np.clip(np.searchsorted(lookup_key, k), 0, max(len(lookup_key) - 1, 0))
            hit = (lookup_key[i] == k) if len(lookup_key) else np.zeros(len(k), bool)
            return np.where(hit, lookup_val[i] if len(lookup_val) else 0.0, 0.0)

        # Logit effects of every feature at once.
        with torch.no_grad():
            effect = sae.W_dec.detach().float().to(W_U.device) @ W_U  # [d_sae, vocab]
            k = min(n_logits, effect.shape[1])
            up, down = torch.topk(effect, k, dim=1), torch.topk(-effect, k, dim=1)
        vocab_ids = sorted(set(up.indices.flatten().tolist()) | set(down.indices.flatten().tolist()))
        vocab_text = dict(zip(vocab_ids, _display(model, vocab_ids)))

        # Example-response strips: entries on the norm view's responses.
        on_chosen = np.isin(seq_of[tok], chosen)
        ct, cf, cv = tok[on_chosen], feat[on_chosen], val[on_chosen]
        by_f = np.argsort(cf, kind="stable")
        ct, cf, cv = ct[by_f], cf[by_f], cv[by_f]
        all_by_f = np.argsort(feat, kind="stable")
        feat_sorted, val_by_f = feat[all_by_f], val[all_by_f]

        rows = {"id": list(range(d_sae)), "density": _rl(st["density"]), "mean": _rl(st["mean"]),
                "mean_active": _rl(st["mean_active"]), "max": _rl(st["max"]), "delta": _rl(st["delta"]),
                "relative_delta": _rl(st["relative_delta"]),
                "reason_score": _rl(rs) if rs is not None else [None] * d_sae,
                "corr": _rl(st["corr"], 3), "top_tokens": []}
        details = []
        for f in range(d_sae):
            lo, hi = np.searchsorted(df, f), np.searchsorted(df, f, side="right")
            cand_t = dt[lo:hi]
            tops = []
            for t in cand_t:
                text = flat_tokens[t]
                if text not in tops:
                    tops.append(text)
                if len(tops) == n_top_tokens:
                    break
            rows["top_tokens"].append(tops)
            examples = []
            for t, v in zip(cand_t[:n_examples], dv[lo:hi][:n_examples]):
                s, p = int(seq_of[t]), int(pos_of[t])
                a, b = max(p - context[0], 0), min(p + context[1] + 1, int(lengths[s]))
                acts = activation_at(np.arange(offsets[s] + a, offsets[s] + b), f)
                examples.append({"seq": s, "pos": p, "start": a, "act": _r(v),
                                 "acts": [None if a + i == 0 else _r(x, 3) for i, x in enumerate(acts.tolist())]})
            # histogram of positive activations, n_bins equal bins on [0, max]
            fv = val_by_f[np.searchsorted(feat_sorted, f):np.searchsorted(feat_sorted, f, side="right")]
            hist = None
            if len(fv):
                counts, edges = np.histogram(fv, bins=n_bins, range=(0.0, float(fv.max())))
                hist = {"edges": _rl(edges), "counts": counts.tolist(), "n_zero": int(st["n_tokens"] - len(fv))}
            strips = []
            a0, a1 = np.searchsorted(cf, f), np.searchsorted(cf, f, side="right")
            if a1 > a0:
                per_seq = {}
                for t, v in zip(ct[a0:a1].tolist(), cv[a0:a1].tolist()):
                    per_seq.setdefault(int(seq_of[t]), []).append([int(pos_of[t]), _r(v, 3)])
                best = sorted(per_seq, key=lambda s: -max(v for _, v in per_seq[s]))[:N_STRIPS]
                strips = [{"response": chosen_pos[s], "seq": s, "acts": per_seq[s]} for s in best]
            details.append({
                "id": f, "examples": examples, "histogram": hist,
                "promoted": [[vocab_text[i], _r(x)] for i, x in zip(up.indices[f].tolist(), up.values[f].tolist())],
                "suppressed": [[vocab_text[i], _r(-x)] for i, x in zip(down.indices[f].tolist(),
                                                                       down.values[f].tolist())],
                "norm_active": _r(st["norm_active"][f]), "n_active": int(st["n_active"][f]), "strips": strips,
            })
        docs[f"index_L{layer}"] = {"layer": layer, "d_sae": d_sae, "hook_name": model.hook_name(layer),
                                   "n_tokens": st["n_tokens"], "features": rows}
        docs[f"features_L{layer}"] = {"layer": layer, "features": details}
        meta = getattr(sae.cfg, "metadata", None)
        name = " / ".join(str(x) for x in (getattr(meta, "release", None), getattr(meta, "sae_id", None)) if x)
        index_meta.append({"layer": layer, "d_sae": d_sae, "sae": name or f"{type(sae).__name__} d_sae={d_sae}",
                           "threshold": _r(thresholds.get(layer)) if thresholds.get(layer) is not None else None,
                           "reason_score": rs is not None})

    docs["corpus"] = {"tokens": display, "modes": list(corpus.modes), "n_prompt": [int(x) for x in corpus.n_prompt],
                      "difficulties": difficulties}
    labels = getattr(corpus, "labels", None) or [None] * len(sequences)
    docs["norms"] = {"layers": layers, "thresholds": {str(l): _r(thresholds[l]) if thresholds.get(l) is not None
                                                      else None for l in layers},
                     "responses": [{"seq": i, "mode": corpus.modes[i], "difficulty": difficulties[i],
                                    "n_prompt": int(corpus.n_prompt[i]),
                                    "labels": [x if x else None for x in (labels[i] or [])],
                                    "norms": {str(l): _rl(observer.norms[l][offsets[i]:offsets[i] + lengths[i]])
                                              for l in layers}} for i in chosen]}
    docs["meta"] = {"version": SCHEMA_VERSION, "model": str(model.name), "layers": index_meta,
                    "n_sequences": len(sequences), "n_tokens": int(eligible.sum()),
                    "n_thinking_tokens": int(think_mask.sum()), "n_non_thinking_tokens": int(nothink_mask.sum()),
                    "organism": getattr(model, "source", None) == "organism", "context": list(context),
                    "n_examples": n_examples}
    return docs
