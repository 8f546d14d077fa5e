"""The ``tellnorm`` command. Only argparse is imported at start-up: ``tellnorm --help`` answers at once, and each
subcommand imports the slow libraries (torch, transformer_lens, sae_lens) when it runs."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _organism_train(args) -> None:
    from tellnorm.organism.paths import DEFAULT_ORGANISM_DIR
    from tellnorm.organism.train import OrganismTrainConfig, train_organism

    overrides = {name: value for name, value in (("steps", args.steps), ("lr", args.lr)) if value is not None}
    cfg = OrganismTrainConfig(seed=args.seed, **overrides)  # validates before any work
    out = Path(args.out) if args.out else DEFAULT_ORGANISM_DIR
    meta = train_organism(cfg, out_dir=out)
    print(f"trained organism in {meta['train_seconds']:.0f} s, final loss {meta['final_loss']:.4f} -> {out}")


def _organism_eval(args) -> None:
    from tellnorm.io import write_csv
    from tellnorm.backends import load_model
    from tellnorm.organism.evaluate import EvalConfig, evaluate, format_summary

    cfg = EvalConfig(per_difficulty=args.n, difficulties=tuple(args.difficulty), modes=tuple(args.mode),
                     batch_size=args.batch_size)
    model = load_model(args.model)
    per_problem, summary = evaluate(model, cfg)
    print(format_summary(summary))
    if args.csv:
        write_csv(summary, args.csv)
        print(f"wrote {args.csv}")


def _sharded(args) -> bool:
    """Whether ``--ray``/``--workers`` ask for Ray (checked before any work; without them Ray is never imported)."""
    from tellnorm.errors import TellnormError

    if args.workers < 1:
        raise TellnormError(f"--workers must be ≥ 1, got {args.workers}")
    if args.workers > 1 and args.ray is None:
        raise TellnormError("--workers needs --ray ADDRESS (local, auto, HOST:PORT or ray://HOST:PORT)")
    return args.ray is not None


def _runner(args):
    """Where a study runs, as a context manager: None (in this process, on the model the command loads) without
    ``--ray``; else a Ray :class:`~tellnorm.apps.distributed.ShardPool` of ``--workers`` replicas of ``--model``
    (and ``--saes``), closed on exit. Its shard time-out is ``$TELLNORM_SHARD_TIMEOUT_S`` (default one hour)."""
    import contextlib

    if args.ray is None:
        return contextlib.nullcontext(None)
    from tellnorm.apps.distributed import ShardPool, shard_timeout_from_env

    return ShardPool(args.model, ray_address=args.ray, workers=args.workers, saes=getattr(args, "saes", None),
                     shard_timeout_s=shard_timeout_from_env())


def _add_ray_flags(p) -> None:
    p.add_argument("--ray", default=None, metavar="ADDRESS", help="shard the prompts over Ray: local, auto, "
                   "HOST:PORT or ray://HOST:PORT (one model replica per worker)")
    p.add_argument("--workers", type=int, default=1, help="model replicas with --ray (default 1)")


def _profile(args) -> None:
    from tellnorm.studies.profile import ProfileConfig, run_profile

    cfg = ProfileConfig(model=args.model, prompts=args.prompts, n_per_difficulty=args.n, out=args.out,
                        point=args.point, max_new_tokens=args.max_new_tokens)
    if _sharded(args):  # bad input fails before any cluster starts
        from tellnorm.io import check_output_dir
        from tellnorm.studies.corpus import load_prompts

        if cfg.prompts:
            load_prompts(cfg.prompts)
        check_output_dir(cfg.out)
    with _runner(args) as runner:
        run_profile(cfg, runner=runner)


def _bench_norms(args) -> None:
    from tellnorm.apps.bench.norms import BenchConfig, bench_norms

    bench_norms(BenchConfig(config=args.config, n_layers=args.layers, batch=args.batch, seq=args.seq,
                            repeats=args.repeats, out=args.out))


def _bench_techniques(args) -> None:
    from tellnorm.apps.bench.techniques import TechniqueBenchConfig, bench_techniques

    bench_techniques(TechniqueBenchConfig(
        config=args.config, n_layers=args.layers, prompts=args.prompts, prompt_len=args.prompt_len,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, repeats=args.repeats, threads=args.threads,
        seed=args.seed, stop_at_eos=args.stop_at_eos, out=args.out))


def _bench_backends(args) -> None:
    from tellnorm.apps.bench.backends import BackendBenchConfig, bench_backends

    bench_backends(BackendBenchConfig(config=args.config, n_layers=args.layers, prompts=args.prompts,
                                      max_new_tokens=args.max_new_tokens, repeats=args.repeats, dtype=args.dtype,
                                      out=args.out))


def _sae_train(args) -> None:
    from tellnorm.backends import load_model
    from tellnorm.saes.training import SAETrainConfig
    from tellnorm.studies.features import sae_suite_study

    preset = SAETrainConfig if args.paper else SAETrainConfig.organism
    overrides = {"l1_coefficient": args.l1} if args.l1 is not None else {}
    cfg = preset(architecture=args.architecture, expansion=args.expansion, epochs=args.epochs, lr=args.lr,
                 corpus_problems=args.corpus_problems, seed=args.seed, **overrides)
    _, quality = sae_suite_study(load_model(args.model), cfg, args.out)
    print(quality.round(4).to_string(index=False))


def _features(args) -> None:
    from tellnorm.figures import write_figure
    from tellnorm.backends import load_model
    from tellnorm.norms import layer_profile
    from tellnorm.norms import trace_forward
    from tellnorm.saes import load_saes
    from tellnorm.studies.corpus import contrast_corpus
    from tellnorm.studies.features import feature_study, trend_figure

    _sharded(args)
    model = load_model(args.model)
    saes = load_saes(args.saes, model)
    out = Path(args.out)
    with _runner(args) as runner:
        corpus = contrast_corpus(model, args.n, runner=runner)
        result = feature_study(model, saes, corpus, out, top_k=args.top_k, runner=runner)
    trace = trace_forward(model, corpus.sequences, n_prompt=corpus.n_prompt,
                          request_ids=list(range(len(corpus.sequences))))
    frame = trace.frame.assign(mode=trace.frame.request_id.map(dict(enumerate(corpus.modes))))
    profile = layer_profile(frame[frame.is_generated & ~frame.is_position_zero], by=["mode"])
    write_figure(trend_figure(profile, result["trend"], args.top_k), out / "feature_trend")
    print(result["trend"].round(4).to_string(index=False))
    print(f"wrote {out}/features_*.csv, feature_trend.csv, feature_trend.(html|png)")


def _dashboard(args) -> None:
    from tellnorm.backends import load_model
    from tellnorm.saes import load_saes
    from tellnorm.apps.dashboards import dashboard_study
    from tellnorm.features import check_features
    from tellnorm.studies.corpus import contrast_corpus
    from tellnorm.studies.features import feature_scores, feature_study, parse_feature_list

    features = parse_feature_list(args.features) if args.features else None  # checked before any generation
    model = load_model(args.model)
    saes = load_saes(args.saes, model)
    if features is not None:
        features = check_features(saes, features)
    corpus = contrast_corpus(model, args.n)
    if features is not None:
        scores = {}
    else:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            result = feature_study(model, saes, corpus, Path(tmp))
        features = result["top_reason"]
        scores = feature_scores(result)
    path = dashboard_study(model, saes, corpus, features, scores, Path(args.out))
    print(f"wrote {path}")


def _explore(args) -> None:
    """Check every argument (layers, feature, SAEs against the model) before generating the corpus."""
    from tellnorm.errors import TellnormError
    from tellnorm.apps.explorer import build_explorer, check_feature, check_saes
    from tellnorm.backends import load_model
    from tellnorm.saes import load_saes

    if args.n < 1:
        raise TellnormError(f"--n must be ≥ 1 (problems per difficulty), got {args.n}: the corpus would be empty")
    try:
        layers = [int(x) for x in args.layers.split(",") if x.strip()] if args.layers else None
        feature = tuple(int(x) for x in args.feature.split(":")) if args.feature else None
    except ValueError:
        raise TellnormError("cannot read --layers L1,L2 or --feature LAYER:ID (e.g. --layers 6,7 --feature 6:12)") from None
    if feature is not None and len(feature) != 2:
        raise TellnormError(f"cannot read --feature {args.feature!r}: write LAYER:ID, e.g. 6:12")
    model = load_model(args.model)
    saes = load_saes(args.saes, model)
    check_saes(model, saes)
    if layers is not None:
        missing = [l for l in layers if l not in saes]
        if missing or not layers:
            raise TellnormError(f"no SAE for layer(s) {missing or layers}: the SAEs cover layers {sorted(saes)}")
        saes = {l: saes[l] for l in layers}
    if feature is not None:
        check_feature(saes, *feature)
    index = build_explorer(model, saes, Path(args.out), n_per_difficulty=args.n, progress=True)
    print(f"wrote {index}")
    if feature is not None:
        print(f"feature page: {index.resolve().as_uri()}#/feature/{feature[0]}/{feature[1]}")


def _intervene(args) -> None:
    from tellnorm.studies.suppression import InterventionConfig, format_suppression, run_intervene
    from tellnorm.backends import load_model
    from tellnorm.thresholds import ThresholdConfig

    threshold = ThresholdConfig(**{k: v for k, v in (("k", args.k), ("warmup", args.warmup)) if v is not None})
    cfg = InterventionConfig(  # validates before any work
        per_difficulty=args.n, calibration_per_difficulty=args.calibration_n, factors=tuple(args.factors),
        amplify=tuple(args.amplify), random_seeds=tuple(args.seeds), threshold_mode=args.threshold_mode,
        thresholds_file=args.thresholds, threshold=threshold, steering=not args.no_steering,
        features=not args.no_features, saes=args.saes, batch_size=args.batch_size)
    if _sharded(args):
        from tellnorm.studies.suppression import check_intervention_shardable

        check_intervention_shardable(cfg)  # before any work
    model = load_model(args.model)
    with _runner(args) as runner:
        result = run_intervene(model, cfg, Path(args.out), runner=runner)
    print(format_suppression(result["suppression"]))
    print(f"wrote {args.out}/suppression.csv, suppression_hits.csv, suppression_top_tokens.csv, suppression.(html|png)"
          f"{', steering.csv' if cfg.steering else ''}{', feature_ablation.csv' if cfg.features else ''} "
          f"in {result['seconds']:.0f} s")


def _evaluate(args) -> None:
    from tellnorm.errors import TellnormError
    from tellnorm.studies.evaluation import EvaluateConfig, run_evaluate
    from tellnorm.backends import load_model
    from tellnorm.techniques import ALRRConfig, ERSSConfig
    from tellnorm.thresholds import ThresholdConfig

    layers = None
    if args.layers:
        try:
            layers = tuple(int(v) for v in args.layers.split(","))
        except ValueError:
            raise TellnormError(f"--layers {args.layers!r}: give layer indices separated by commas, e.g. 20,21,22")
    threshold = ThresholdConfig(**{k: v for k, v in (("k", args.k), ("warmup", args.warmup)) if v is not None})
    quick = dict(per_difficulty=2, calibration_per_difficulty=3, n_samples=4, sample_sizes=(2, 4),
                 sensitivity=False) if args.quick else {}
    options = dict(task=args.task, extractor=args.extractor, thinking=not args.no_thinking,
                   calibration=args.calibration, techniques=tuple(args.techniques), controls=not args.no_controls,
                   threshold_mode=args.threshold_mode, thresholds_file=args.thresholds, threshold=threshold,
                   alrr=ALRRConfig(layers=layers), erss=ERSSConfig(layers=layers), batch_size=args.batch_size,
                   sensitivity=not args.no_sensitivity)
    for name in ("per_difficulty", "n_samples", "sampling_seed", "max_new_tokens"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    cfg = EvaluateConfig(**{**options, **quick})  # validates before any work
    if _sharded(args):
        from tellnorm.studies.evaluation import check_evaluation_shardable

        check_evaluation_shardable(cfg)  # before any work
    model = load_model(args.model)
    with _runner(args) as runner:
        result = run_evaluate(model, cfg, Path(args.out), runner=runner)
    print(result["markdown"])
    print(f"wrote {args.out}/evaluation.csv, evaluation.md, evaluation_*.csv and the figures")


def _analysis_setup(args, *, bounds: bool):
    """Check every argument of ``bounds`` / ``correlate`` before the slow work (generation), then load."""
    from tellnorm.bounds import SUPPORTED_ARCHITECTURES
    from tellnorm.features import select_saes
    from tellnorm.studies.correlation import MIN_LAYERS
    from tellnorm.errors import TellnormError
    from tellnorm.backends import load_model
    from tellnorm.saes import load_saes

    out = Path(args.out)
    if args.n < 1:
        raise TellnormError(f"--n must be ≥ 1 (problems per difficulty), got {args.n}: the corpus would be empty")
    if args.top_k < 1:
        raise TellnormError(f"--top-k must be ≥ 1, got {args.top_k}")
    model = load_model(args.model)
    saes = select_saes(model, load_saes(args.saes, model), top_k=args.top_k, layers=args.layers,
                       architectures=SUPPORTED_ARCHITECTURES if bounds else None, min_layers=1 if bounds else MIN_LAYERS)
    return model, saes, out


def _contrast_study(args, study, *, bounds: bool):
    """``study`` (bounds or correlation) on the contrast corpus, sharded over Ray when ``--ray`` asks for it."""
    from tellnorm.studies.corpus import contrast_corpus

    _sharded(args)
    model, saes, out = _analysis_setup(args, bounds=bounds)
    with _runner(args) as runner:
        corpus = contrast_corpus(model, args.n, runner=runner)
        return study(model, saes, corpus, out, top_k=args.top_k, runner=runner), out


def _bounds(args) -> None:
    from tellnorm.studies.bounds import bounds_study

    result, out = _contrast_study(args, bounds_study, bounds=True)
    for name in ("bounds", "assumptions", "pairs"):
        print(result[name].to_string(index=False, float_format="{:.4g}".format))
    print(f"wrote {out}/bounds*.csv, bounds_norm_vs_reasoning.(html|png), bounds_pairs.(html|png)")


def _correlate(args) -> None:
    from tellnorm.studies.correlation import correlation_study

    result, out = _contrast_study(args, correlation_study, bounds=False)
    print(result["table"].to_string(index=False, float_format="{:.1f}".format))
    print(f"wrote {out}/correlation*.csv, correlation_alignment.(html|png)")


def _reproduce(args) -> None:
    from tellnorm.apps.reproduce import ReproduceConfig, reproduce

    reproduce(ReproduceConfig(out=args.out, per_difficulty=args.n, quick=args.quick), force=args.force)


def build_parser() -> argparse.ArgumentParser:
    from tellnorm.organism.task import MAX_DIFFICULTY, MIN_DIFFICULTY
    from tellnorm.apps.reproduce import STAGE_NAMES

    parser = argparse.ArgumentParser(prog="tellnorm", description="The ℓ2 norm of hidden states as a signal for "
                                     "reasoning dynamics: tracing, SAEs, reasoning features, test-time techniques.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("reproduce", help="the main job: evaluate the organism, trace norms, write figures and tables")
    p.add_argument("--out", default="figures", help="output folder (default: figures)")
    p.add_argument("--n", type=int, default=100, help="test problems per difficulty and mode (default: 100)")
    p.add_argument("--quick", action="store_true", help="every stage at small sizes (a smoke test, < 3 min)")
    p.add_argument("--force", action="append", default=[], metavar="STAGE",
                   help="rerun STAGE (and the stages that read its outputs) even if its inputs are unchanged; "
                   f"repeatable; 'all' for every stage. Stages: {', '.join(STAGE_NAMES)}")
    p.set_defaults(func=_reproduce)

    organism = sub.add_parser("organism", help="the embedded model organism: train or evaluate it")
    osub = organism.add_subparsers(dest="organism_command", metavar="ACTION", required=True)
    p = osub.add_parser("train", help="train the organism (deterministic under --seed; ~20 min on 2 cores)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (default: the config's 3600)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the config's 2e-3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default: the shipped data/organism)")
    p.set_defaults(func=_organism_train)
    p = osub.add_parser("eval", help="accuracy by difficulty and mode, with n and bootstrap 95%% CIs")
    p.add_argument("--model", default="organism")
    p.add_argument("--n", type=int, default=100, help="test problems per difficulty (default: 100)")
    p.add_argument("--difficulty", type=int, nargs="+", default=list(range(MIN_DIFFICULTY, MAX_DIFFICULTY + 1)),
                   help=f"levels to evaluate ({MIN_DIFFICULTY}..{MAX_DIFFICULTY})")
    p.add_argument("--mode", nargs="+", default=["thinking", "non-thinking"], help="thinking and/or non-thinking")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--csv", default=None, help="also write the accuracy table to this CSV file")
    p.set_defaults(func=_organism_eval)

    p = sub.add_parser("profile", help="per-layer norm profile, thinking vs non-thinking, with figures")
    p.add_argument("--model", default="organism")
    p.add_argument("--prompts", default=None, help="JSONL file with a 'prompt' field per line (default: organism test set)")
    p.add_argument("--n", type=int, default=20, help="organism test problems per difficulty (default: 20)")
    p.add_argument("--point", default="resid_post", help="hook point: resid_pre, resid_mid, resid_post, attn_out, mlp_out")
    p.add_argument("--max-new-tokens", type=int, default=240)
    p.add_argument("--out", default="figures/profile")
    p.add_argument("--ray", default=None, metavar="ADDRESS", help="shard the prompts over Ray: local, auto, "
                   "HOST:PORT or ray://HOST:PORT (one model replica per worker)")
    p.add_argument("--workers", type=int, default=1, help="model replicas with --ray (default 1)")
    p.set_defaults(func=_profile)

    sae = sub.add_parser("sae", help="per-layer SAEs (sae_lens): train the suite and report its quality")
    ssub = sae.add_subparsers(dest="sae_command", metavar="ACTION", required=True)
    p = ssub.add_parser("train", help="train one SAE per layer on the model's own responses (reproduces data/organism_saes)")
    p.add_argument("--model", default="organism")
    p.add_argument("--architecture", default="standard", help="standard (ReLU + L1, the paper's), topk or jumprelu")
    p.add_argument("--expansion", type=int, default=4)
    p.add_argument("--epochs", type=float, default=6)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--l1", type=float, default=None, help="L1 coefficient (default: the organism preset's; "
                   "--paper: the paper's 1e-3)")
    p.add_argument("--paper", action="store_true", help="the paper's constants exactly (dense SAEs in sae_lens's "
                   "loss normalisation; see README)")
    p.add_argument("--corpus-problems", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default: the shipped data/organism_saes)")
    p.set_defaults(func=_sae_train)

    p = sub.add_parser("features", help="reasoning features: thinking/non-thinking contrast, ReasonScore, controls")
    p.add_argument("--model", default="organism")
    p.add_argument("--saes", default="organism", help="'organism', a folder, FORMAT:PATH or RELEASE:ID")
    p.add_argument("--n", type=int, default=10, help="validation problems per difficulty (default: 10)")
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--out", default="figures/features")
    p.add_argument("--ray", default=None, metavar="ADDRESS", help="shard the prompts over Ray: local, auto, "
                   "HOST:PORT or ray://HOST:PORT (one model replica per worker)")
    p.add_argument("--workers", type=int, default=1, help="model replicas with --ray (default 1)")
    p.set_defaults(func=_features)

    p = sub.add_parser("dashboard", help="offline HTML dashboards of features (default: top ReasonScore features)")
    p.add_argument("--model", default="organism")
    p.add_argument("--saes", default="organism")
    p.add_argument("--features", default=None, help="LAYER:F1,F2 ... (default: top 5 of each late layer)")
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--out", default="figures/dashboard.html")
    p.set_defaults(func=_dashboard)

    p = sub.add_parser("explore", help="offline explorer site: every feature of every layer, and the norms on tokens")
    p.add_argument("--model", default="organism")
    p.add_argument("--saes", default="organism", help="'organism', a folder, FORMAT:PATH or RELEASE:ID")
    p.add_argument("--n", type=int, default=5, help="validation problems per difficulty (default: 5)")
    p.add_argument("--layers", default=None, help="L1,L2 ... (default: every layer with an SAE)")
    p.add_argument("--feature", default=None, help="LAYER:ID: check it exists and print its page's address")
    p.add_argument("--out", default="figures/explorer", help="output folder (index.html, assets/, data/)")
    p.set_defaults(func=_explore)

    for name, func, help_text in (
            ("bounds", _bounds, "check the norm-bounds-feature-activation theorem per layer: exact bound, paired "
                                "two-sided relation, assumptions A1-A4"),
            ("correlate", _correlate, "Spearman across layers: norm vs SAE reasoning activation, and the competing "
                                      "intrinsic signals")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--model", default="organism")
        p.add_argument("--saes", default="organism", help="'organism', a folder, FORMAT:PATH or RELEASE:ID")
        p.add_argument("--n", type=int, default=10, help="validation problems per difficulty (default: 10)")
        p.add_argument("--top-k", type=int, default=20, help="reasoning features per layer (default: 20)")
        p.add_argument("--layers", type=int, nargs="+", default=None, help="layers to analyse (default: every SAE's)")
        p.add_argument("--out", default=f"figures/{name}")
        _add_ray_flags(p)
        p.set_defaults(func=func)

    p = sub.add_parser("intervene", help="causal tests: suppress high-norm vs random tokens, steer, ablate features")
    p.add_argument("--model", default="organism")
    p.add_argument("--saes", default="organism", help="SAEs for the feature ablation (as in tellnorm features)")
    p.add_argument("--n", type=int, default=10, help="test problems per difficulty (default: 10)")
    p.add_argument("--calibration-n", type=int, default=10,
                   help="validation problems per difficulty for thresholds, steering direction, features (default: 10)")
    p.add_argument("--factors", type=float, nargs="+", default=[0.1, 0.25, 0.5], help="suppression factors c < 1")
    p.add_argument("--amplify", type=float, nargs="*", default=[2.0], help="amplification factors c > 1")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the random matched control")
    p.add_argument("--threshold-mode", default="calibrated", help="calibrated (default: fixed τ from validation "
                   "responses), fixed (--thresholds FILE), exact or pooled-p2 (streaming, with --warmup)")
    p.add_argument("--thresholds", default=None, help="JSON file of per-layer τ for --threshold-mode fixed")
    p.add_argument("--k", type=float, default=None, help="τ = Q3 + k·IQR (default: the paper's 1.5)")
    p.add_argument("--warmup", type=int, default=None, help="steps before a streaming threshold exists (default 500)")
    p.add_argument("--no-steering", action="store_true", help="skip steering along the thinking direction")
    p.add_argument("--no-features", action="store_true", help="skip the reasoning-feature ablation")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--out", default="figures/interventions")
    _add_ray_flags(p)
    p.set_defaults(func=_intervene)

    p = sub.add_parser("evaluate", help="ALRR, ERSS, LRS and combinations vs compute-matched baselines")
    p.add_argument("--model", default="organism")
    p.add_argument("--task", default="organism",
                   help='"organism" (its test set) or a JSONL of {"prompt", "answer"[, "group", "id"]} lines')
    p.add_argument("--extractor", default="organism",
                   help="answer extractor for a JSONL task: last-number (default there), boxed, or regex:PATTERN")
    p.add_argument("--calibration", default=None, help="JSONL of calibration prompts for τ (default: the task's)")
    p.add_argument("--no-thinking", action="store_true", help="JSONL prompts with the thinking switch off")
    p.add_argument("--n", dest="per_difficulty", type=int, default=None, help="organism problems per difficulty")
    p.add_argument("--n-samples", type=int, default=None, help="N for the selectors (default 8)")
    p.add_argument("--sampling-seed", type=int, default=None)
    p.add_argument("--techniques", nargs="+", default=["alrr", "erss", "alrr+erss"],
                   help="decode-time techniques and '+' combinations")
    p.add_argument("--layers", default=None, help="target layers of ALRR and ERSS, e.g. 20,21 (default: late)")
    p.add_argument("--threshold-mode", default="calibrated", help="calibrated (default), exact, pooled-p2 or fixed")
    p.add_argument("--thresholds", default=None, help="JSON file of per-layer τ for --threshold-mode fixed")
    p.add_argument("--k", type=float, default=None, help="τ = Q3 + k·IQR (default: the paper's 1.5)")
    p.add_argument("--warmup", type=int, default=None, help="steps before a streaming threshold exists")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--no-controls", action="store_true", help="skip the random recursion controls")
    p.add_argument("--no-sensitivity", action="store_true", help="skip the k / loops / streak / N sweeps")
    p.add_argument("--quick", action="store_true", help="a minute-long smoke run (2 problems per difficulty, N=4)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--out", default="figures/evaluation")
    p.add_argument("--ray", default=None, metavar="ADDRESS", help="shard the prompts over Ray: local, auto, "
                   "HOST:PORT or ray://HOST:PORT (one model replica per worker)")
    p.add_argument("--workers", type=int, default=1, help="model replicas with --ray (default 1)")
    p.set_defaults(func=_evaluate)

    sub.add_parser("harness", help="lm-eval with --model tellnorm: every argument is lm-eval's "
                   "(tellnorm harness --model tellnorm --model_args pretrained=organism,technique=alrr --tasks ...)")

    bench = sub.add_parser("bench", help="benchmarks (ratios measured side by side in one run)")
    bsub = bench.add_subparsers(dest="bench_command", metavar="WHAT", required=True)
    p = bsub.add_parser("norms", help="overhead of norm tracing vs a plain forward and run_with_cache")
    p.add_argument("--config", default="qwen3-0.6b", help="model shape (random init): qwen3-0.6b or organism")
    p.add_argument("--layers", type=int, default=None, help="override the number of layers (faster runs)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="figures/bench")
    p.set_defaults(func=_bench_norms)
    p = bsub.add_parser("techniques", help="wall time of generation with ALRR, ERSS, LRS bookkeeping vs plain")
    p.add_argument("--config", default="organism", help="organism (trained; random-init with --layers) or "
                   "qwen3-0.6b (random init)")
    p.add_argument("--layers", type=int, default=None, help="override the number of layers (random-init weights)")
    p.add_argument("--prompts", type=int, default=10, help="organism test prompts, one per difficulty in turn")
    p.add_argument("--prompt-len", type=int, default=None, help="random token-id prompts of this length instead")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated per request (EOS ignored)")
    p.add_argument("--stop-at-eos", action="store_true", help="stop at EOS (token counts may then differ)")
    p.add_argument("--batch-size", type=int, default=None, help="default: every prompt in one batch")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's setting)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="figures/bench")
    p.set_defaults(func=_bench_techniques)
    p = bsub.add_parser("backends", help="tokens/s of plain vLLM, vLLM + tracing / each technique, and HF")
    p.add_argument("--config", default="organism", help="organism (trained) or qwen3-0.6b (random init)")
    p.add_argument("--layers", type=int, default=None, help="override the number of layers (random-init weights)")
    p.add_argument("--prompts", type=int, default=10, help="organism test prompts, one per difficulty in turn")
    p.add_argument("--max-new-tokens", type=int, default=96, help="tokens generated per request (EOS ignored)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default="float32", help="float32 only: the bench compares the backends' outputs")
    p.add_argument("--out", default="figures/bench")
    p.set_defaults(func=_bench_backends)
    return parser


FILE_OUTPUTS = {_dashboard}  # commands whose --out names a file, not a folder


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no machine tellnorm runs on can download weights
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["harness"]:  # lm-eval's own arguments pass through untouched
        from tellnorm.apps.harness.cli import main as harness_main

        return harness_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    from tellnorm.errors import TellnormError

    try:
        if getattr(args, "out", None) and args.func not in FILE_OUTPUTS:
            from tellnorm.io import check_output_dir

            check_output_dir(args.out)  # before any command spends time
        args.func(args)
    except TellnormError as err:
        print(f"tellnorm: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tellnorm: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
