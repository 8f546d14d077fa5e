"""The ``tellnorm`` command. Only argparse is imported at start-up: ``tellnorm --help`` answers at once, and each
subcommand imports the slow libraries (torch, transformer_lens, sae_lens) when it runs."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable
    from contextlib import AbstractContextManager

    from sae_lens import SAE

    from tellnorm.apps.distributed import ShardPool
    from tellnorm.backends.base import ModelAPI


def _organism_train(args: argparse.Namespace) -> None:
    from tellnorm.organism.paths import DEFAULT_ORGANISM_DIR
    from tellnorm.organism.train import OrganismTrainConfig, train_organism

    overrides = {name: value for name, value in (("steps", args.steps), ("lr", args.lr)) if value is not None}
    cfg = OrganismTrainConfig(seed=args.seed, **overrides)  # validates before any work
    out = Path(args.out) if args.out else DEFAULT_ORGANISM_DIR
    meta = train_organism(cfg, out_dir=out)
    print(f"trained organism in {meta['train_seconds']:.0f} s, final loss {meta['final_loss']:.4f} -> {out}")


def _organism_eval(args: argparse.Namespace) -> None:
    from tellnorm.backends import load_model
    from tellnorm.io import write_csv
    from tellnorm.organism.evaluate import EvalConfig, evaluate, format_summary

    cfg = EvalConfig(per_difficulty=args.n, difficulties=tuple(args.difficulty), modes=tuple(args.mode),
                     batch_size=args.batch_size)
    model = load_model(args.model)
    _per_problem, summary = evaluate(model, cfg)
    print(format_summary(summary))
    if args.csv:
        write_csv(summary, args.csv)
        print(f"wrote {args.csv}")


def _sharded(args: argparse.Namespace) -> bool:
    """Whether ``--ray``/``--workers`` ask for Ray (checked before any work; without them Ray is never imported)."""
    from tellnorm.errors import TellnormError

    if args.workers < 1:
        raise TellnormError(f"--workers must be ≥ 1, got {args.workers}")
    if args.workers > 1 and args.ray is None:
        raise TellnormError("--workers needs --ray ADDRESS (local, auto, HOST:PORT or ray://HOST:PORT)")
    return args.ray is not None


def _runner(args: argparse.Namespace) -> AbstractContextManager[ShardPool | None]:
    """Where a study runs, as a context manager: None (in this process, on the model the command loads) without
    ``--ray``; else a Ray :class:`~tellnorm.apps.distributed.ShardPool` of ``--workers`` replicas of ``--model``
    (and ``--saes``), closed on exit. Its shard time-out is ``$TELLNORM_SHARD_TIMEOUT_S`` (default one hour)."""
    import contextlib

    if args.ray is None:
        return contextlib.nullcontext(None)
    from tellnorm.apps.distributed import ShardPool, shard_timeout_from_env

    return ShardPool(args.model, ray_address=args.ray, workers=args.workers, saes=getattr(args, "saes", None),
                     shard_timeout_s=shard_timeout_from_env())


def _profile(args: argparse.Namespace) -> None:
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


def _bench_norms(args: argparse.Namespace) -> None:
    from tellnorm.apps.bench.norms import BenchConfig, bench_norms

    bench_norms(BenchConfig(config=args.config, n_layers=args.layers, batch=args.batch, seq=args.seq,
                            repeats=args.repeats, out=args.out))


def _bench_techniques(args: argparse.Namespace) -> None:
    from tellnorm.apps.bench.techniques import TechniqueBenchConfig, bench_techniques

    bench_techniques(TechniqueBenchConfig(
        config=args.config, n_layers=args.layers, prompts=args.prompts, prompt_len=args.prompt_len,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, repeats=args.repeats, threads=args.threads,
        seed=args.seed, stop_at_eos=args.stop_at_eos, out=args.out))


def _bench_backends(args: argparse.Namespace) -> None:
    from tellnorm.apps.bench.backends import BackendBenchConfig, bench_backends

    bench_backends(BackendBenchConfig(config=args.config, n_layers=args.layers, prompts=args.prompts,
                                      max_new_tokens=args.max_new_tokens, repeats=args.repeats, dtype=args.dtype,
                                      engines=tuple(args.engines), out=args.out))


def _bench_attention(args: argparse.Namespace) -> None:
    from tellnorm.apps.bench.attention import AttentionBenchConfig, bench_attention

    bench_attention(AttentionBenchConfig(config=args.config, n_layers=args.layers, batch=args.batch,
                                         contexts=tuple(args.contexts), decode_steps=args.decode_steps,
                                         repeats=args.repeats, eager_up_to=args.eager_up_to, device=args.device,
                                         dtype=args.dtype, memory=not args.no_memory, out=args.out))


def _bench_lengths(args: argparse.Namespace) -> None:
    from tellnorm.apps.bench.lengths import LengthsBenchConfig, bench_lengths

    bench_lengths(LengthsBenchConfig(config=args.config, n_layers=args.layers, lengths=tuple(args.lengths),
                                     window=args.window, variants=tuple(args.variants), repeats=args.repeats,
                                     prompt_len=args.prompt_len, device=args.device, threads=args.threads,
                                     out=args.out))


def _sae_train(args: argparse.Namespace) -> None:
    from tellnorm.backends import load_model
    from tellnorm.saes.training import SAETrainConfig
    from tellnorm.studies.features import sae_suite_study

    preset = SAETrainConfig if args.paper else SAETrainConfig.organism
    overrides = {"l1_coefficient": args.l1} if args.l1 is not None else {}
    cfg = preset(architecture=args.architecture, expansion=args.expansion, epochs=args.epochs, lr=args.lr,
                 corpus_problems=args.corpus_problems, seed=args.seed, **overrides)
    _, quality = sae_suite_study(load_model(args.model), cfg, args.out)
    print(quality.round(4).to_string(index=False))


def _features(args: argparse.Namespace) -> None:
    from tellnorm.backends import load_model
    from tellnorm.figures import write_figure
    from tellnorm.norms import layer_profile, trace_forward
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


def _dashboard(args: argparse.Namespace) -> None:
    from tellnorm.apps.dashboards import dashboard_study
    from tellnorm.backends import load_model
    from tellnorm.features import check_features
    from tellnorm.saes import load_saes
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


def _explore(args: argparse.Namespace) -> None:
    """Check every argument (layers, feature, SAEs against the model) before generating the corpus."""
    from tellnorm.apps.explorer import build_explorer, check_feature, check_saes
    from tellnorm.backends import load_model
    from tellnorm.errors import TellnormError
    from tellnorm.saes import load_saes

    if args.n < 1:
        raise TellnormError(f"--n must be ≥ 1 (problems per difficulty), got {args.n}: the corpus would be empty")
    try:
        layers = [int(x) for x in args.layers.split(",") if x.strip()] if args.layers else None
        feature = tuple(int(x) for x in args.feature.split(":")) if args.feature else None
    except ValueError:
        raise TellnormError("cannot read --layers L1,L2 or --feature LAYER:ID "
                            "(e.g. --layers 6,7 --feature 6:12)") from None
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


def _intervene(args: argparse.Namespace) -> None:
    from tellnorm.backends import load_model
    from tellnorm.errors import TellnormError
    from tellnorm.studies.suppression import InterventionConfig, format_suppression, load_calibration, run_intervene
    from tellnorm.thresholds import ThresholdConfig

    threshold = ThresholdConfig(**{k: v for k, v in (("k", args.k), ("warmup", args.warmup)) if v is not None})
    options = {} if args.max_new_tokens is None else {"max_new_tokens": args.max_new_tokens}
    cfg = InterventionConfig(  # validates before any work
        per_difficulty=args.n, calibration_per_difficulty=args.calibration_n, factors=tuple(args.factors),
        amplify=tuple(args.amplify), random_seeds=tuple(args.seeds), threshold_mode=args.threshold_mode,
        thresholds_file=args.thresholds, threshold=threshold, steering=not args.no_steering,
        features=not args.no_features, saes=args.saes, batch_size=args.batch_size, n_problems=args.n_problems,
        n_calibration=args.n_calibration, **options)
    task = calibration = None
    if args.task is not None:  # read before the model loads: a bad file fails in seconds
        from tellnorm.tasks import load_task

        task = load_task(args.task)
        calibration = load_calibration(args.calibration) if args.calibration else None
    elif args.calibration or args.n_problems is not None or args.n_calibration is not None:
        raise TellnormError("--calibration, --n-problems and --n-calibration go with --task (the organism's "
                            "problems are --n and --calibration-n per difficulty)")
    if _sharded(args):
        from tellnorm.studies.suppression import check_intervention_shardable

        check_intervention_shardable(cfg)  # before any work
    model = load_model(args.model)
    with _runner(args) as runner:
        result = run_intervene(model, cfg, Path(args.out), task=task, calibration=calibration, runner=runner)
    print(format_suppression(result["suppression"]))
    print(f"wrote {', '.join(p.name for p in result['written'])} in {args.out} in {result['seconds']:.0f} s")
    for measure, reason in result["meta"].get("skipped", {}).items():
        print(f"skipped {measure}: {reason}")


def _evaluate(args: argparse.Namespace) -> None:
    from tellnorm.backends import load_model
    from tellnorm.errors import TellnormError
    from tellnorm.studies.evaluation import EvaluateConfig, run_evaluate
    from tellnorm.techniques import ALRRConfig, ERSSConfig
    from tellnorm.thresholds import ThresholdConfig

    layers = None
    if args.layers:
        try:
            layers = tuple(int(v) for v in args.layers.split(","))
        except ValueError:
            raise TellnormError(f"--layers {args.layers!r}: give layer indices separated by commas, "
                                "e.g. 20,21,22") from None
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


def _analysis_setup(args: argparse.Namespace, *, bounds: bool) -> tuple[ModelAPI, dict[int, SAE], Path]:
    """Check every argument of ``bounds`` / ``correlate`` before the slow work (generation), then load."""
    from tellnorm.backends import load_model
    from tellnorm.bounds import SUPPORTED_ARCHITECTURES
    from tellnorm.errors import TellnormError
    from tellnorm.features import select_saes
    from tellnorm.saes import load_saes
    from tellnorm.studies.correlation import MIN_LAYERS

    out = Path(args.out)
    if args.n < 1:
        raise TellnormError(f"--n must be ≥ 1 (problems per difficulty), got {args.n}: the corpus would be empty")
    if args.top_k < 1:
        raise TellnormError(f"--top-k must be ≥ 1, got {args.top_k}")
    model = load_model(args.model)
    saes = select_saes(model, load_saes(args.saes, model), top_k=args.top_k, layers=args.layers,
                       architectures=SUPPORTED_ARCHITECTURES if bounds else None,
                       min_layers=1 if bounds else MIN_LAYERS)
    return model, saes, out


def _contrast_study(args: argparse.Namespace, study: Callable[..., dict[str, Any]], *,
                    bounds: bool) -> tuple[dict[str, Any], Path]:
    """``study`` (bounds or correlation) on the contrast corpus, sharded over Ray when ``--ray`` asks for it."""
    from tellnorm.studies.corpus import contrast_corpus

    _sharded(args)
    model, saes, out = _analysis_setup(args, bounds=bounds)
    with _runner(args) as runner:
        corpus = contrast_corpus(model, args.n, runner=runner)
        return study(model, saes, corpus, out, top_k=args.top_k, runner=runner), out


def _bounds(args: argparse.Namespace) -> None:
    from tellnorm.studies.bounds import bounds_study

    result, out = _contrast_study(args, bounds_study, bounds=True)
    for name in ("bounds", "assumptions", "pairs"):
        print(result[name].to_string(index=False, float_format="{:.4g}".format))
    print(f"wrote {out}/bounds*.csv, bounds_norm_vs_reasoning.(html|png), bounds_pairs.(html|png)")


def _correlate(args: argparse.Namespace) -> None:
    from tellnorm.studies.correlation import correlation_study

    result, out = _contrast_study(args, correlation_study, bounds=False)
    print(result["table"].to_string(index=False, float_format="{:.1f}".format))
    print(f"wrote {out}/correlation*.csv, correlation_alignment.(html|png)")


def _reproduce(args: argparse.Namespace) -> None:
    from tellnorm.apps.reproduce import ReproduceConfig, reproduce

    reproduce(ReproduceConfig(out=args.out, per_difficulty=args.n, quick=args.quick, model=args.model, saes=args.saes,
                              tasks=tuple(args.task), extractor=args.extractor, contrast_model=args.contrast_model,
                              backend=args.backend, device=args.device, dtype=args.dtype, problems=args.problems,
                              sampling=args.sampling, only=tuple(args.only)), force=args.force)


def _report(args: argparse.Namespace) -> None:
    from tellnorm.apps.report import build_report

    written = build_report(args.runs, args.out)
    print(f"wrote {', '.join(p.name for p in written)} in {args.out}")


def build_parser() -> argparse.ArgumentParser:
    """The ``tellnorm`` parser (:mod:`tellnorm.apps.parser`) wired to this module's handlers."""
    from tellnorm.apps.parser import build_parser as build

    return build(HANDLERS)


HANDLERS = {
    "reproduce": _reproduce, "organism_train": _organism_train, "organism_eval": _organism_eval, "profile": _profile,
    "sae_train": _sae_train, "features": _features, "dashboard": _dashboard, "explore": _explore, "bounds": _bounds,
    "correlate": _correlate, "intervene": _intervene, "evaluate": _evaluate, "bench_norms": _bench_norms,
    "bench_techniques": _bench_techniques, "bench_backends": _bench_backends, "bench_attention": _bench_attention,
    "bench_lengths": _bench_lengths,
    "report": _report,
}
FILE_OUTPUTS = {_dashboard}  # commands whose --out names a file, not a folder


def main(argv: list[str] | None = None) -> int:
    """Run ``tellnorm`` with ``argv`` (default: the process's arguments) and return its exit status: 0 done,
    2 a TellnormError (printed as one line), 130 interrupted; ``tellnorm harness ...`` goes to lm-eval's own CLI."""
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
