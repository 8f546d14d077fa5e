"""The reasoning-feature study (PAPER.md §2) on a model: the contrast and ReasonScore per layer, the top-K trend
(also on token-matched positions), the token-injection control, the label overlap, and the SAE suite it reads."""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tellnorm.errors import TellnormError
from tellnorm.studies.corpus import MODES, ContrastCorpus, contrast_corpus, matched_positions
from tellnorm.studies.runners import Replica, Runner, Shard, as_runner, merge_accumulators

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go
    from sae_lens import SAE

    from tellnorm.backends.base import ModelAPI
    from tellnorm.features import FeatureSums
    from tellnorm.saes.training import SAETrainConfig

# --- feature sums on a runner -------------------------------------------------------------------------------------

def feature_sums_shard(replica: Replica, shard: Shard, items: list[tuple[Hashable, list[int], dict | None]], *,
                       saes: Any, layers: Sequence[int] | None = None, fold_decoder_norm: bool = False,
                       batch_size: int = 16) -> FeatureSums:
    """:func:`tellnorm.features.collect_feature_sums` of one shard's ``(request_id, sequence, bucket masks)`` items
    (``saes``: loaded SAEs or a spec, see :meth:`~tellnorm.studies.runners.Replica.saes`)."""
    from tellnorm.features import collect_feature_sums

    return collect_feature_sums(replica.model, replica.saes(saes, layers), [seq for _, seq, _ in items],
                                {rid: masks for rid, _, masks in items if masks is not None},
                                request_ids=[rid for rid, _, _ in items], fold_decoder_norm=fold_decoder_norm,
                                batch_size=batch_size)


def feature_sums(runner: Runner, saes: Any, sequences: Sequence[Sequence[int]],
                 bucket_masks: Mapping[Hashable, dict], *, request_ids: Sequence[Hashable] | None = None,
                 fold_decoder_norm: bool = False, batch_size: int = 16) -> FeatureSums:
    """:func:`tellnorm.features.collect_feature_sums` on ``runner``, sharded by sequence and merged with
    ``FeatureSums.merge`` (every count as in one call; float64 sums up to the order of additions).

    ``saes``: the driver's SAEs (the workers of a Ray pool load the pool's SAE spec and use these layers) or an SAE
    spec."""
    request_ids = list(request_ids) if request_ids is not None else list(range(len(sequences)))
    items = [(rid, list(seq), bucket_masks.get(rid)) for rid, seq in zip(request_ids, sequences)]
    return runner.map(feature_sums_shard, items, merge=merge_accumulators, saes=runner.sae_source(saes),
                      layers=list(saes) if isinstance(saes, Mapping) else None,
                      fold_decoder_norm=fold_decoder_norm, batch_size=batch_size)


def feature_collector(runner: Runner) -> Callable[..., FeatureSums]:
    """:func:`feature_sums` on ``runner`` in :func:`tellnorm.features.collect_feature_sums`'s call form (for the
    core functions that take ``collect=``, e.g. :func:`tellnorm.features.reasoning_features`)."""

    def collect(model, saes, sequences, bucket_masks, *, request_ids=None, fold_decoder_norm=False, batch_size=16):
        return feature_sums(runner, saes, sequences, bucket_masks, request_ids=request_ids,
                            fold_decoder_norm=fold_decoder_norm, batch_size=batch_size)

    return collect


# --- the study ----------------------------------------------------------------------------------------------------

def feature_study(model: ModelAPI, saes: dict[int, SAE], corpus: ContrastCorpus, out: Path, *, top_k: int = 20,
                  groups: Sequence[str] | None = None, seed: int = 0, runner: Runner | None = None) -> dict[str, Any]:
    """The paper's contrast and ReasonScore for every layer (PAPER.md §2), the top-K trend, and the two controls
    (token injection, label overlap); writes their CSV tables into ``out`` and returns them by name.

    ``runner``: where the contrast and injection sums run (None: here, on ``model``; a Ray pool shards them by
    sequence, its workers loading the pool's SAE spec)."""
    from tellnorm import features as F
    from tellnorm.io import write_csv

    runner = as_runner(runner, model)

    layers = sorted(saes)
    vocab = F.vocabulary_token_ids(model.tokenizer, groups or F.REASON_SCORE_GROUPS)
    ignore = {model.tokenizer.pad_token_id, model.tokenizer.eos_token_id}
    contrast = F.contrast_masks(corpus.sequences, corpus.n_prompt, corpus.modes)
    thinking_seqs = [corpus.sequences[i] for i in corpus.thinking]
    reason = F.reason_score_masks(thinking_seqs, vocab, ignore_ids=ignore,
                                  start=[corpus.n_prompt[i] for i in corpus.thinking])
    masks = {i: dict(contrast[i]) for i in range(len(corpus.sequences))}
    for j, i in enumerate(corpus.thinking):
        masks[i].update(reason[j])
    matched = matched_positions(model, corpus)
    if matched is not None:
        for i, buckets in F.matched_contrast_masks(matched, [len(s) for s in corpus.sequences], corpus.modes).items():
            masks[i].update(buckets)
    sums = feature_sums(runner, saes, corpus.sequences, masks, fold_decoder_norm=True)
    contrast_tab = F.contrast_table(sums, layers)
    try:
        reason_tab = F.reason_score_table(sums, layers, list(vocab))
        reason_note = None
    except TellnormError as err:  # responses without reasoning words (a random stand-in, a terse model)
        reason_tab, reason_note = None, str(err)
    trend = F.top_k_scores(contrast_tab, k=top_k)
    write_csv(contrast_tab[contrast_tab["rank"] <= 100], out / "features_contrast_top100.csv")
    write_csv(trend, out / "feature_trend.csv")
    late = model.late_layers()
    if reason_tab is not None:
        write_csv(reason_tab[reason_tab["rank"] <= 100], out / "features_reasonscore_top100.csv")
        top_reason = {layer: reason_tab[(reason_tab.layer == layer) & (reason_tab["rank"] <= 5)].feature.tolist()
                      for layer in late}
        injection = token_injection_control(model, saes, corpus, vocab, top_reason, seed=seed, runner=runner)
        write_csv(injection, out / "features_token_injection.csv")
    else:  # the dashboards show the top contrast features instead; the report says why
        top_reason = {layer: contrast_tab[(contrast_tab.layer == layer) & (contrast_tab["rank"] <= 5)].feature.tolist()
                      for layer in late}
        injection = None
    result = {"contrast": contrast_tab, "reason": reason_tab, "trend": trend, "injection": injection,
              "top_reason": top_reason, "reason_score_note": reason_note}
    if matched is not None:
        result["matched_trend"] = matched_feature_trend(sums, contrast_tab, layers, top_k, corpus.modes, seed=seed)
        write_csv(result["matched_trend"], out / "feature_trend_matched.csv")
    if model.token_labeler is not None:  # step labels (the organism's) to compare features with
        top_contrast = {
            layer: contrast_tab[(contrast_tab.layer == layer) & (contrast_tab["rank"] <= 5)].feature.tolist()
            for layer in late}
        overlap = F.label_overlap(model, saes, corpus.sequences, corpus.labels, top_contrast)
        write_csv(overlap, out / "features_label_overlap.csv")
        result["overlap"] = overlap
    return result


def matched_feature_trend(sums: FeatureSums, contrast_tab: pd.DataFrame, layers: Sequence[int], top_k: int,
                          modes: Sequence[str], *, seed: int = 0) -> pd.DataFrame:
    """The reasoning-feature trend (PAPER.md §2) on token-matched positions only, two ways: features re-ranked by
    the contrast on matched tokens (``thinking``, ``non-thinking``, with bootstrap 95% CIs over problems and of their
    difference; the top-K set is chosen once on all problems and held fixed), and the all-token top-K features
    evaluated on matched tokens (``all_token_features_*``); ``top_k_jaccard`` is the overlap of the two sets.
    ``modes[i]`` is request i's mode; the j-th thinking and the j-th non-thinking request are one problem."""
    import numpy as np

    from tellnorm import features as F
    from tellnorm.stats import percentile_interval, resample_indices

    buckets = ("thinking" + F.MATCHED_SUFFIX, "non-thinking" + F.MATCHED_SUFFIX)
    matched_tab = F.contrast_table(sums, layers, buckets=buckets)
    trend = F.top_k_scores(matched_tab, k=top_k)
    requests = {mode: [i for i, m in enumerate(modes) if m == mode] for mode in MODES}
    paired = [(t, n) for t, n in zip(requests["thinking"], requests["non-thinking"])
              if sums.has(layers[0], F.MATCHED_REQUEST_BUCKET.format(t))
              and sums.has(layers[0], F.MATCHED_REQUEST_BUCKET.format(n))]
    idx = resample_indices(len(paired), seed=seed)
    for layer in layers:
        all_top = set(contrast_tab[contrast_tab.layer == layer].nsmallest(top_k, "rank").feature)
        matched_top = set(matched_tab[matched_tab.layer == layer].nsmallest(top_k, "rank").feature)
        row = trend.layer == layer
        chosen = sorted(all_top)
        trend.loc[row, "all_token_features_thinking"] = float(sums.mean(layer, buckets[0])[chosen].mean())
        trend.loc[row, "all_token_features_non_thinking"] = float(sums.mean(layer, buckets[1])[chosen].mean())
        trend.loc[row, "top_k_jaccard"] = len(all_top & matched_top) / len(all_top | matched_top)
        top = sorted(matched_top)
        per_problem = {}  # mode -> (summed top-K activation, token count) of each problem's response
        for k, mode in enumerate(MODES):
            keys = [(layer, F.MATCHED_REQUEST_BUCKET.format(pair[k])) for pair in paired]
            per_problem[mode] = (np.array([float(sums.sums[key][top].mean()) for key in keys]),
                                 np.array([sums.counts[key] for key in keys], dtype=np.float64))
        boot = {mode: total[idx].sum(1) / count[idx].sum(1) for mode, (total, count) in per_problem.items()}
        for name, samples in (("thinking", boot["thinking"]), ("non_thinking", boot["non-thinking"]),
                              ("delta", boot["thinking"] - boot["non-thinking"])):
            trend.loc[row, f"{name}_ci_low"], trend.loc[row, f"{name}_ci_high"] = percentile_interval(samples)
    trend["n_problems"] = len(paired)
    trend["n_tokens_thinking"] = [sums.counts[(layer, buckets[0])] for layer in trend.layer]
    trend["n_tokens_non_thinking"] = [sums.counts[(layer, buckets[1])] for layer in trend.layer]
    return trend


def token_injection_control(model: ModelAPI, saes: Mapping[int, SAE], corpus: ContrastCorpus,
                            vocab: Mapping[str, Sequence[tuple[int, ...]]], features: Mapping[int, Sequence[int]], *,
                            seed: int = 0, every: int = 4, runner: Runner | None = None) -> pd.DataFrame:
    """Do top ReasonScore features fire on reasoning words pasted into non-reasoning text (the user prompts)?
    The token-injection control of PAPER.md §8 for the ReasonScore features of §2.

    Per feature: mean activation (decoder-norm folded) on windows around *injected* words, on windows around the
    same words in genuine thinking traces, and on all other prompt tokens. injected ≈ genuine means the feature
    responds to the word, not to reasoning. ``runner``: where the sums run (None: here, on ``model``)."""
    import pandas as pd

    from tellnorm import features as F

    rng = random.Random(seed)
    word_ids = [ids for patterns in vocab.values() for ids in patterns]
    injected_seqs, masks = [], {}
    ignore = {model.tokenizer.pad_token_id, model.tokenizer.eos_token_id}
    thinking = corpus.thinking
    for j, i in enumerate(thinking):
        prompt = corpus.sequences[i][: corpus.n_prompt[i]]
        seq, starts = F.inject_words(prompt[:-6], word_ids, every=every, start=3, rng=rng)
        injected_seqs.append(seq)
        window = [False] * len(seq)
        for s in starts:
            length = next(len(w) for w in word_ids if tuple(seq[s : s + len(w)]) in (w,))
            for p in range(max(1, s - F.WINDOW_LEFT), min(len(seq), s + length - 1 + F.WINDOW_RIGHT + 1)):
                window[p] = True
        masks[("injected", j)] = {"injected": window, "other": [p > 0 and not w for p, w in enumerate(window)]}
    genuine = F.reason_score_masks([corpus.sequences[i] for i in thinking], vocab, ignore_ids=ignore,
                                   start=[corpus.n_prompt[i] for i in thinking])
    for j, _i in enumerate(thinking):
        masks[("genuine", j)] = {"genuine": genuine[j]["P"]}
    seqs = injected_seqs + [corpus.sequences[i] for i in thinking]
    ids = [("injected", j) for j in range(len(thinking))] + [("genuine", j) for j in range(len(thinking))]
    chosen = {layer: saes[layer] for layer in features}
    sums = feature_sums(as_runner(runner, model), chosen, seqs, masks, request_ids=ids, fold_decoder_norm=True)
    rows = []
    for layer, feats in features.items():
        for f in feats:
            inj = float(sums.mean(layer, "injected")[f])
            gen = float(sums.mean(layer, "genuine")[f])
            rows.append({"layer": layer, "feature": f, "injected": inj, "genuine": gen,
                         "other_prompt_tokens": float(sums.mean(layer, "other")[f]),
                         "injected_over_genuine": inj / gen if gen > 0 else float("nan")})
    return pd.DataFrame(rows)


def trend_figure(norm_profile: pd.DataFrame, feature_trend: pd.DataFrame, k: int,
                 matched_trend: pd.DataFrame | None = None) -> go.Figure:
    """The paper's two trends side by side (PAPER.md §2): hidden-state norm and mean top-K reasoning-feature
    activation (with ``matched_trend``, also the trend of features ranked on token-matched positions, dashed).
    ``norm_profile``: :func:`tellnorm.norms.layer_profile`'s rows by mode; ``feature_trend``:
    :func:`tellnorm.features.top_k_scores`'s; ``matched_trend``: :func:`matched_feature_trend`'s."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from tellnorm.figures import MODE_COLORS, style

    fig = make_subplots(rows=1, cols=2, subplot_titles=("Hidden-state L2 norm (mean, 95% CI)",
                                                        f"Mean top-{k} reasoning-feature activation"))
    for mode in MODES:
        color = MODE_COLORS[mode]
        g = norm_profile[norm_profile["mode"] == mode].sort_values("layer")
        fig.add_trace(go.Scatter(x=g.layer, y=g.mean_norm, name=mode, legendgroup=mode, mode="lines+markers",
                                 line={"color": color},
                                 error_y={"type": "data", "symmetric": False, "array": g.ci_high - g.mean_norm,
                                          "arrayminus": g.mean_norm - g.ci_low}), row=1, col=1)
        fig.add_trace(go.Scatter(x=feature_trend.layer, y=feature_trend[mode], name=mode, legendgroup=mode,
                                 showlegend=False, mode="lines+markers", line={"color": color}), row=1, col=2)
        if matched_trend is not None:
            fig.add_trace(go.Scatter(x=matched_trend.layer, y=matched_trend[mode], name=f"{mode}, matched tokens",
                                     mode="lines+markers", line={"color": color, "dash": "dash"},
                                     marker={"symbol": "diamond"}), row=1, col=2)
    fig.update_xaxes(title_text="layer")
    fig.update_yaxes(title_text="mean ‖h‖₂", row=1, col=1)
    fig.update_yaxes(title_text="mean activation (decoder-norm folded)", row=1, col=2)
    return style(fig, title="Norm and reasoning-feature trends by layer (thinking vs non-thinking)", width=980)


def parse_feature_list(text: str) -> dict[int, list[int]]:
    """``"6:12,40 5:3"`` → {6: [12, 40], 5: [3]}."""
    out: dict[int, list[int]] = {}
    for part in text.split():
        layer, sep, feats = part.partition(":")
        try:
            out.setdefault(int(layer), []).extend(int(f) for f in feats.split(",") if f)
        except ValueError:
            raise TellnormError(f"cannot read features {part!r}: write LAYER:F1,F2 (e.g. 6:12,40)") from None
        if not sep:
            raise TellnormError(f"cannot read features {part!r}: write LAYER:F1,F2 (e.g. 6:12,40)")
    if not out:
        raise TellnormError("the feature list is empty: write LAYER:F1,F2 (e.g. 6:12,40)")
    return out


CORPUS_SEED_OFFSET = 50_000  # corpus problems come from their own stream, disjoint from test and validation


def organism_corpus_prompts(model: ModelAPI, n_problems: int, seed: int) -> list[tuple[str, list[int]]]:
    """(mode, prompt ids) for fresh training-distribution problems in both modes."""
    from tellnorm.organism import task

    held_out = task.test_split().keys() | task.validation_split().keys()
    stream = task.training_problems(seed + CORPUS_SEED_OFFSET, held_out)
    problems = [next(stream) for _ in range(n_problems)]
    out = []
    for mode in ("thinking", "non-thinking"):
        for p in problems:
            out.append((mode, model.encode(model.chat_prompt(p.prompt_text(), thinking=mode == "thinking"))))
    return out


def sae_suite_study(model: ModelAPI, cfg: SAETrainConfig | None = None, out_dir: str | Path | None = None, *,
                    quality_corpus: ContrastCorpus | None = None,
                    progress: bool = True) -> tuple[dict[int, SAE], pd.DataFrame]:
    """Train the per-layer SAE suite (PAPER.md §2) on the model's own responses and measure it on held-out
    responses; returns ``(saes, quality)`` and writes ``quality.csv`` beside the SAEs in ``out_dir`` (default: the
    organism's SAE folder)."""
    from tellnorm.organism.paths import DEFAULT_SAE_DIR
    from tellnorm.saes.quality import sae_quality
    from tellnorm.saes.training import SAETrainConfig, build_corpus, train_saes

    cfg = cfg or SAETrainConfig.organism()
    out_dir = Path(out_dir) if out_dir is not None else DEFAULT_SAE_DIR
    prompts = [ids for _, ids in organism_corpus_prompts(model, cfg.corpus_problems, cfg.seed)]
    corpus = build_corpus(model, prompts, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, progress=progress)
    saes = train_saes(model, corpus, cfg, out_dir)
    held_out = quality_corpus or contrast_corpus(model, progress=progress)
    quality = sae_quality(model, saes, held_out.sequences, n_prompt=held_out.n_prompt)
    from tellnorm.io import write_csv

    write_csv(quality, out_dir / "quality.csv")
    return saes, quality


def feature_scores(result: Mapping[str, Any]) -> dict[tuple[int, int], dict[str, float]]:
    """{(layer, feature): {"reason_score": ..., "differential": ...}} for dashboard cards, from
    :func:`feature_study`'s result."""
    scores = {}
    for row in (result["reason"].itertuples() if result["reason"] is not None else ()):
        scores.setdefault((row.layer, row.feature), {})["reason_score"] = row.reason_score
    for row in result["contrast"].itertuples():
        scores.setdefault((row.layer, row.feature), {})["differential"] = row.delta
    return scores
