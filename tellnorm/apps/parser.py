"""The ``tellnorm`` command line's parser, one builder per command (the handlers live in :mod:`tellnorm.apps.cli`).

Every command has a description and an example; every option says what it accepts, and its default is shown
(:class:`HelpFormatter`). ``tests/test_cli_help.py`` walks every command's ``--help`` and fails on an option
without help.
"""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Callable, Mapping
from typing import Any

Handlers = Mapping[str, Callable[[argparse.Namespace], None]]

MODEL_HELP = ("the model: 'organism' (the shipped model organism), a local HF model folder, or a hub name already "
              "in the local HF cache (nothing is downloaded)")
SAES_HELP = ("the SAEs: 'organism' (the organism's per-layer suite), a folder of sae_lens SAEs, FORMAT:PATH for a "
             "registry's native files (e.g. qwen-scope:DIR) or RELEASE:ID from sae_lens's registry (cached)")
RAY_HELP = ("shard the prompts over Ray, one model replica per worker: 'local' (a cluster on this machine), "
            "'auto', HOST:PORT or ray://HOST:PORT (default: no Ray, one process)")
THRESHOLD_MODE_HELP = ("how τ is set: calibrated (Q3 + k·IQR of the model's own greedy validation responses), "
                       "fixed (--thresholds FILE), exact (per request, after --warmup steps) or pooled-p2 "
                       "(the paper code's streaming quartiles)")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and examples as written; ``(default: X)`` after every option whose help does not say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        return f"{text} (default: {shown})"


def _command(sub: Any, name: str, summary: str, description: str, example: str) -> argparse.ArgumentParser:
    """A subcommand with a one-line summary (the parent's list), a description and an example (its own help)."""
    text = textwrap.fill(f"{summary[0].upper()}{summary[1:]}.", 100) + "\n\n" + textwrap.fill(description, 100)
    return sub.add_parser(name, help=summary.replace("%", "%%"), description=text, epilog=f"example:\n  {example}",
                          formatter_class=HelpFormatter)


def _model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="organism", metavar="MODEL", help=MODEL_HELP)


def _saes(p: argparse.ArgumentParser, what: str = "") -> None:
    p.add_argument("--saes", default="organism", metavar="SPEC", help=SAES_HELP + what)


def _out(p: argparse.ArgumentParser, default: str | None, what: str = "output folder") -> None:
    p.add_argument("--out", default=default, metavar="PATH", help=what)


def _ray(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray", default=None, metavar="ADDRESS", help=RAY_HELP)
    p.add_argument("--workers", type=int, default=1, metavar="N", help="model replicas with --ray")


def _thresholds(p: argparse.ArgumentParser, warmup: str) -> None:
    p.add_argument("--threshold-mode", default="calibrated", metavar="MODE", help=THRESHOLD_MODE_HELP)
    p.add_argument("--thresholds", default=None, metavar="FILE",
                   help='JSON file of per-layer τ for --threshold-mode fixed, e.g. {"layers": {"6": 12.5}}')
    p.add_argument("--k", type=float, default=None, help="τ = Q3 + k·IQR (default: the paper's 1.5)")
    p.add_argument("--warmup", type=int, default=None, help=f"steps before a streaming threshold exists {warmup}")


def add_reproduce(sub: Any, handlers: Handlers) -> None:
    """``tellnorm reproduce``: the whole study in cached stages."""
    from tellnorm.apps.reproduce import STAGE_NAMES

    p = _command(sub, "reproduce", "the paper's whole study, cached: on the organism, or on any model with --task",
                 "Accuracy, norm profile, peaks, features, bounds, correlation, interventions, evaluation, dashboards "
                 "and the explorer; REPORT.md judges each paper claim. A stage whose inputs (files, settings, code) "
                 "are unchanged is skipped. With --model/--saes/--task the study runs on that model and its tasks at "
                 "the paper code's budgets (4,096 / 2,048 / 1,024 tokens) and sampling; stages that need the "
                 "organism's step labels are skipped with the reason.",
                 "tellnorm reproduce --quick --out runs/quick\n  tellnorm reproduce --model /models/Qwen3-8B --saes "
                 "qwen-scope:/models/SAE-Res-Qwen3-8B-Base-W64K-L0_50 --task gsm8k.jsonl=last-number "
                 "--task aime.jsonl=boxed --backend vllm --device cuda --dtype bfloat16 --out runs/qwen3-8b")
    _out(p, "figures", "output folder of the tables, figures and REPORT.md")
    p.add_argument("--n", type=int, default=100, help="organism: test problems per difficulty and mode")
    p.add_argument("--model", default="organism", help="a local HF folder or cached hub name (default: organism)")
    p.add_argument("--saes", default="organism", help="SAE spec: a folder, FORMAT:PATH (qwen-scope:, llama-scope-r1:, "
                   "...) or RELEASE:ID")
    p.add_argument("--task", action="append", default=[], metavar="SPEC",
                   help="FILE.jsonl[=EXTRACTOR] of {prompt, answer[, id, group]} lines, or lm-eval:NAME; repeatable")
    p.add_argument("--extractor", default="last-number",
                   help="answer extractor of a --task that names none: last-number, boxed, choice-letter, math, "
                   "regex:PATTERN")
    p.add_argument("--contrast-model", default=None, help="the non-thinking model of a model without a thinking switch")
    p.add_argument("--backend", default="hf", choices=("hf", "vllm"), help="where generation-heavy stages run")
    p.add_argument("--device", default="cpu", help="device of the HF backend (cpu, cuda)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--problems", type=int, default=None, help="problems per task (default: all)")
    p.add_argument("--sampling", default="paper", choices=("paper", "greedy"),
                   help="the paper code's sampling (default) or greedy for the responses")
    p.add_argument("--only", action="append", default=[], metavar="STAGE",
                   help="run only STAGE and the stages it reads; repeatable (default: every stage)")
    p.add_argument("--quick", action="store_true", help="every stage at small sizes (a smoke test, < 3 min)")
    p.add_argument("--force", action="append", default=[], metavar="STAGE",
                   help="rerun STAGE (and the stages that read its outputs) even if its inputs are unchanged; "
                   f"repeatable; 'all' for every stage. Stages: {', '.join(STAGE_NAMES)} (default: none)")
    p.set_defaults(func=handlers["reproduce"])


def add_organism(sub: Any, handlers: Handlers) -> None:
    """``tellnorm organism train | eval``."""
    from tellnorm.organism.task import MAX_DIFFICULTY, MIN_DIFFICULTY

    organism = _command(sub, "organism", "the embedded model organism: train or evaluate it",
                        "The organism is a tiny Qwen3-architecture model trained on chains of mod-10 assignments, "
                        "with Qwen3's chat template and thinking switch.", "tellnorm organism eval --n 20")
    osub = organism.add_subparsers(dest="organism_command", metavar="ACTION", required=True)
    p = _command(osub, "train", "train the organism (deterministic under --seed; ≈ 24 min on 2 cores)",
                 "Rebuilds data/organism (or --out) from scratch: tokenizer, chat template, weights.",
                 "tellnorm organism train --out runs/organism")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (default: the config's 3600)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the config's 2e-3)")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    _out(p, None, "output folder (default: the shipped data/organism)")
    p.set_defaults(func=handlers["organism_train"])
    p = _command(osub, "eval", "accuracy by difficulty and mode, with n and bootstrap 95% CIs",
                 "Greedy answers to held-out test problems in thinking and non-thinking mode.",
                 "tellnorm organism eval --n 20 --difficulty 1 5 10 --csv accuracy.csv")
    _model(p)
    p.add_argument("--n", type=int, default=100, help="test problems per difficulty")
    p.add_argument("--difficulty", type=int, nargs="+", default=list(range(MIN_DIFFICULTY, MAX_DIFFICULTY + 1)),
                   metavar="STEPS", help=f"levels to evaluate, {MIN_DIFFICULTY}..{MAX_DIFFICULTY} steps")
    p.add_argument("--mode", nargs="+", default=["thinking", "non-thinking"], help="thinking and/or non-thinking")
    p.add_argument("--batch-size", type=int, default=50, help="requests generated together")
    p.add_argument("--csv", default=None, metavar="FILE", help="also write the accuracy table to this CSV file")
    p.set_defaults(func=handlers["organism_eval"])


def add_profile(sub: Any, handlers: Handlers) -> None:
    """``tellnorm profile``."""
    p = _command(sub, "profile", "per-layer norm profile, thinking vs non-thinking, with figures",
                 "The same prompts in both modes (greedy); statistics over generated tokens, position 0 excluded, "
                 "CIs resampling requests; all tokens and token-matched positions.",
                 "tellnorm profile --prompts my_prompts.jsonl --model path/to/Qwen3-4B --out runs/profile")
    _model(p)
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="JSONL file with a 'prompt' field per line (default: the organism's test set)")
    p.add_argument("--n", type=int, default=20, help="organism test problems per difficulty")
    p.add_argument("--point", default="resid_post",
                   help="hook point: resid_pre, resid_mid, resid_post, attn_out or mlp_out")
    p.add_argument("--max-new-tokens", type=int, default=240, help="tokens generated per response at most")
    _out(p, "figures/profile")
    _ray(p)
    p.set_defaults(func=handlers["profile"])


def add_sae(sub: Any, handlers: Handlers) -> None:
    """``tellnorm sae train``."""
    sae = _command(sub, "sae", "per-layer SAEs (sae_lens): train the suite and report its quality",
                   "One SAE per layer through sae_lens, with L0, FVU, dead features and the spliced-in loss.",
                   "tellnorm sae train --out runs/saes")
    ssub = sae.add_subparsers(dest="sae_command", metavar="ACTION", required=True)
    p = _command(ssub, "train", "train one SAE per layer on the model's own responses",
                 "Reproduces data/organism_saes with the defaults; --paper uses the paper's constants exactly.",
                 "tellnorm sae train --architecture topk --expansion 8 --out runs/saes")
    _model(p)
    p.add_argument("--architecture", default="standard", help="standard (ReLU + L1, the paper's), topk or jumprelu")
    p.add_argument("--expansion", type=int, default=4, help="d_sae / d_model")
    p.add_argument("--epochs", type=float, default=6, help="passes over the activation corpus")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    p.add_argument("--l1", type=float, default=None, help="L1 coefficient (default: the organism preset's 2.0; "
                   "--paper: the paper's 1e-3)")
    p.add_argument("--paper", action="store_true", help="the paper's constants exactly (dense SAEs in sae_lens's "
                   "loss normalisation; see docs/organism.md)")
    p.add_argument("--corpus-problems", type=int, default=600, help="training problems answered in both modes")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    _out(p, None, "output folder (default: the shipped data/organism_saes)")
    p.set_defaults(func=handlers["sae_train"])


def add_features(sub: Any, handlers: Handlers) -> None:
    """``tellnorm features``."""
    p = _command(sub, "features", "reasoning features: thinking/non-thinking contrast, ReasonScore, controls",
                 "The paper's contrast Δ and ReasonScore per layer, the top-K trend, the token-injection control "
                 "and (on the organism) the overlap with step labels.",
                 "tellnorm features --saes qwen-scope:DIR --model path/to/Qwen3-8B --top-k 20")
    _model(p)
    _saes(p)
    p.add_argument("--n", type=int, default=10, help="validation problems per difficulty")
    p.add_argument("--top-k", type=int, default=20, help="reasoning features per layer")
    _out(p, "figures/features")
    _ray(p)
    p.set_defaults(func=handlers["features"])


def add_dashboard(sub: Any, handlers: Handlers) -> None:
    """``tellnorm dashboard``."""
    p = _command(sub, "dashboard", "offline HTML dashboards of features (default: top ReasonScore features)",
                 "One self-contained page: activation histograms, top contexts, logit effects and the correlation "
                 "with the norm for each feature.", "tellnorm dashboard --features 6:12,40 5:3 --out d.html")
    _model(p)
    _saes(p)
    p.add_argument("--features", default=None, metavar="LAYER:F1,F2",
                   help="features to show, e.g. '6:12,40 5:3' (default: the top 5 of each late layer)")
    p.add_argument("--n", type=int, default=10, help="validation problems per difficulty")
    _out(p, "figures/dashboard.html", "the HTML file to write")
    p.set_defaults(func=handlers["dashboard"])


def add_explore(sub: Any, handlers: Handlers) -> None:
    """``tellnorm explore``."""
    p = _command(sub, "explore", "offline explorer site: every feature of every layer, and the norms on tokens",
                 "A static site (index, one page per feature, the norm view with where each technique acted) "
                 "that opens without network; 65k-feature suites stream a layer at a time.",
                 "tellnorm explore --layers 5,6 --out runs/explorer")
    _model(p)
    _saes(p)
    p.add_argument("--n", type=int, default=5, help="validation problems per difficulty")
    p.add_argument("--layers", default=None, metavar="L1,L2",
                   help="layers to include (default: every layer with an SAE)")
    p.add_argument("--feature", default=None, metavar="LAYER:ID",
                   help="check that the feature exists and print its page's address")
    _out(p, "figures/explorer", "output folder (index.html, assets/, data/)")
    p.set_defaults(func=handlers["explore"])


def add_bounds_and_correlate(sub: Any, handlers: Handlers) -> None:
    """``tellnorm bounds`` and ``tellnorm correlate``: the same inputs, two analyses."""
    commands = (
        ("bounds", "check the norm-bounds-feature-activation theorem per layer",
         "The exact bound per token and feature (0 violations expected), the paired two-sided relation, and the "
         "assumptions A1-A4 (PAPER.md §3).", "tellnorm bounds --layers 4 5 6 --top-k 20"),
        ("correlate", "Spearman across layers: the norm vs the SAE reasoning activation",
         "The paper's correlation table (PAPER.md §4) with the competing intrinsic signals: logit-lens entropy, "
         "hidden-state entropy, attention entropy, final output entropy.", "tellnorm correlate --n 20"))
    for name, summary, description, example in commands:
        p = _command(sub, name, summary, description, example)
        _model(p)
        _saes(p)
        p.add_argument("--n", type=int, default=10, help="validation problems per difficulty")
        p.add_argument("--top-k", type=int, default=20, help="reasoning features per layer")
        p.add_argument("--layers", type=int, nargs="+", default=None,
                       help="layers to analyse (default: every layer with an SAE)")
        _out(p, f"figures/{name}")
        _ray(p)
        p.set_defaults(func=handlers[name])


def add_intervene(sub: Any, handlers: Handlers) -> None:
    """``tellnorm intervene``."""
    p = _command(sub, "intervene", "causal tests: suppress high-norm vs random tokens, amplify, steer, ablate",
                 "High-norm tokens (above τ) scaled by each factor, against random tokens of the matched fraction "
                 "(PAPER.md §5), on the organism's test problems or, with --task, on any model's task; "
                 "amplification, steering along the thinking direction and reasoning-feature ablation beside them "
                 "(skipped, with the reason in interventions.json, on a model without a thinking switch or SAEs).",
                 "tellnorm intervene --factors 0.1 0.5 --seeds 0 1 --no-steering\n  tellnorm intervene --model "
                 "path/to/Qwen3-4B --task gsm8k.jsonl=last-number --n-problems 50 --threshold-mode exact "
                 "--max-new-tokens 2048")
    _model(p)
    _saes(p, " (for the feature ablation)")
    p.add_argument("--task", default=None, metavar="SPEC",
                   help="the problems: FILE.jsonl[=EXTRACTOR] of {prompt, answer[, id, group]} lines or "
                   "lm-eval:NAME (default: the organism's test problems; any other model needs a task)")
    p.add_argument("--calibration", default=None, metavar="SPEC",
                   help="with --task: prompts for thresholds, steering direction and features, a JSONL of {prompt} "
                   "lines or lm-eval:NAME, answers unused (default: the task's own prompts)")
    p.add_argument("--n-problems", type=int, default=None, help="with --task: its first N problems (default: all)")
    p.add_argument("--n-calibration", type=int, default=None,
                   help="with --task: the first N calibration prompts (default: all)")
    p.add_argument("--n", type=int, default=10, help="organism test problems per difficulty")
    p.add_argument("--calibration-n", type=int, default=10,
                   help="organism validation problems per difficulty for thresholds, steering direction and features")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="tokens per response at most (default: the organism's 240; the paper's code uses 2048 on "
                   "real models)")
    p.add_argument("--factors", type=float, nargs="+", default=[0.1, 0.25, 0.5], help="suppression factors c < 1")
    p.add_argument("--amplify", type=float, nargs="*", default=[2.0], help="amplification factors c > 1")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the random matched control")
    _thresholds(p, "(default: 500)")
    p.add_argument("--no-steering", action="store_true", help="skip steering along the thinking direction")
    p.add_argument("--no-features", action="store_true", help="skip the reasoning-feature ablation")
    p.add_argument("--batch-size", type=int, default=50, help="requests generated together")
    _out(p, "figures/interventions")
    _ray(p)
    p.set_defaults(func=handlers["intervene"])


def add_evaluate(sub: Any, handlers: Handlers) -> None:
    """``tellnorm evaluate``."""
    p = _command(sub, "evaluate", "the test-time techniques ALRR, ERSS and LRS vs compute-matched baselines",
                 "ALRR and ERSS (and combinations) as decode-time edits against greedy decoding and random recursion "
                 "controls; LRS (pick by late-layer norm) against majority vote, DeepConf confidences, "
                 "self-certainty and a random pick over the same N samples; accuracy with bootstrap 95% CIs, gains "
                 "in absolute points, compute per problem, and the k / loops / streak / N sensitivity sweeps.",
                 'tellnorm evaluate --task gsm8k.jsonl --extractor last-number --model path/to/Qwen3-4B --quick')
    _model(p)
    p.add_argument("--task", default="organism", metavar="TASK",
                   help='"organism" (its test set) or a JSONL of {"prompt", "answer"[, "group", "id"]} lines')
    p.add_argument("--extractor", default="organism",
                   help="answer extractor for a JSONL task: last-number (default there), boxed, or regex:PATTERN")
    p.add_argument("--calibration", default=None, metavar="FILE",
                   help="JSONL of calibration prompts for τ (default: the task's own prompts, answers unused)")
    p.add_argument("--no-thinking", action="store_true", help="JSONL prompts with the thinking switch off")
    p.add_argument("--n", dest="per_difficulty", type=int, default=None,
                   help="organism problems per difficulty (default: 20)")
    p.add_argument("--n-samples", type=int, default=None, help="N samples for LRS and the selectors (default: 8)")
    p.add_argument("--sampling-seed", type=int, default=None, help="seed of the N samples (default: 0)")
    p.add_argument("--techniques", nargs="+", default=["alrr", "erss", "alrr+erss"],
                   help="decode-time techniques and '+' combinations (LRS is always evaluated on the samples)")
    p.add_argument("--layers", default=None, metavar="L1,L2",
                   help="target layers of ALRR and ERSS, e.g. 20,21 (default: the late layers)")
    _thresholds(p, "(default: the technique's: 500 for ALRR, 200 for ERSS)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens per response at most (default: 240)")
    p.add_argument("--no-controls", action="store_true", help="skip the random recursion controls")
    p.add_argument("--no-sensitivity", action="store_true", help="skip the k / loops / streak / N sweeps")
    p.add_argument("--quick", action="store_true", help="a minute-long smoke run (2 problems per difficulty, N=4)")
    p.add_argument("--batch-size", type=int, default=100, help="requests generated together")
    _out(p, "figures/evaluation")
    _ray(p)
    p.set_defaults(func=handlers["evaluate"])


def add_harness(sub: Any) -> None:
    """``tellnorm harness``: lm-eval's own command line (its arguments never reach this parser)."""
    _command(sub, "harness", "lm-eval with --model tellnorm: every argument is lm-eval's",
             "Runs lm-eval's CLI with tellnorm registered as a model: pretrained=, backend=, technique=, select=, "
             "n=, thresholds= in --model_args.",
             "tellnorm harness --model tellnorm --model_args pretrained=organism,technique=alrr "
             "--tasks tellnorm_organism")


def add_bench(sub: Any, handlers: Handlers) -> None:
    """``tellnorm bench norms | techniques | backends | attention | lengths``."""
    bench = _command(sub, "bench", "benchmarks (ratios measured side by side in one run, repeated)",
                     "Each variant runs in interleaved rounds on the same inputs; results are ratios of medians "
                     "with their spread, written as JSON and CSV.", "tellnorm bench techniques --repeats 9")
    bsub = bench.add_subparsers(dest="bench_command", metavar="WHAT", required=True)
    p = _command(bsub, "norms", "overhead of norm tracing vs a plain forward and run_with_cache",
                 "A plain forward, the same with NormTracer on every layer, and TransformerLens's run_with_cache; "
                 "time and peak memory.", "tellnorm bench norms --config qwen3-0.6b --layers 4")
    p.add_argument("--config", default="qwen3-0.6b", help="model shape (random init): qwen3-0.6b or organism")
    p.add_argument("--layers", type=int, default=None, help="override the number of layers (faster runs)")
    p.add_argument("--batch", type=int, default=4, help="sequences per forward")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    _out(p, "figures/bench")
    p.set_defaults(func=handlers["bench_norms"])
    p = _command(bsub, "techniques", "wall time of generation with ALRR, ERSS and LRS bookkeeping vs plain",
                 "Each technique's cost beyond its extra passes, and the passes' own cost, as ratios to plain "
                 "generation.", "tellnorm bench techniques --config qwen3-0.6b --layers 4 --prompt-len 64")
    p.add_argument("--config", default="organism", help="organism (trained; random-init with --layers) or "
                   "qwen3-0.6b (random init)")
    p.add_argument("--layers", type=int, default=None, help="override the number of layers (random-init weights)")
    p.add_argument("--prompts", type=int, default=10, help="organism test prompts, one per difficulty in turn")
    p.add_argument("--prompt-len", type=int, default=None, help="random token-id prompts of this length instead")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated per request (EOS ignored)")
    p.add_argument("--stop-at-eos", action="store_true", help="stop at EOS (token counts may then differ)")
    p.add_argument("--batch-size", type=int, default=None, help="requests per batch (default: every prompt at once)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's setting)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts and weights")
    _out(p, "figures/bench")
    p.set_defaults(func=handlers["bench_techniques"])
    p = _command(bsub, "backends", "tokens/s of plain vLLM, vLLM + tracing / each technique, and HF",
                 "vLLM in each engine mode (in-process, multi-process, tensor-parallel over 2 ranks) against itself "
                 "with tellnorm's observers, and the HF backend; the outputs are compared token for token.",
                 "tellnorm bench backends --repeats 9 --engines in-process multi-process tp2")
    p.add_argument("--config", default="organism", help="organism (trained) or qwen3-0.6b (random init)")
    p.add_argument("--layers", type=int, default=None, help="override the number of layers (random-init weights)")
    p.add_argument("--prompts", type=int, default=10, help="organism test prompts, one per difficulty in turn")
    p.add_argument("--max-new-tokens", type=int, default=96, help="tokens generated per request (EOS ignored)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    p.add_argument("--dtype", default="float32", help="float32 only: the bench compares the backends' outputs")
    p.add_argument("--engines", nargs="+", choices=["in-process", "multi-process", "tp2"],
                   default=["in-process", "multi-process", "tp2"],
                   help="vLLM engine modes, loaded side by side (tp2: multi-process, tensor_parallel_size=2)")
    _out(p, "figures/bench")
    p.set_defaults(func=handlers["bench_backends"])
    p = _command(bsub, "attention", "the HF backend vs raw HF on one attention kernel, prefill and decode by length",
                 "A prefill and one decode step at each context length, tellnorm's HF backend against the raw HF model "
                 "with the same weights and kernel, and the bridge as booted (eager, bridged blocks); time ratios and "
                 "peak prefill memory.", "tellnorm bench attention --contexts 128 1024 4096 8192")
    p.add_argument("--config", default="qwen3-0.6b", help="model shape (random init): qwen3-0.6b or organism")
    p.add_argument("--layers", type=int, default=2, help="number of layers (the shape's width)")
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 1024, 4096], help="context lengths in tokens")
    p.add_argument("--batch", type=int, default=1, help="sequences per call")
    p.add_argument("--decode-steps", type=int, default=20, help="decode steps per round (their median is timed)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    p.add_argument("--eager-up-to", type=int, default=4096,
                   help="longest context for the bridge variant (eager: its prefill holds heads x T^2 scores); 0: skip")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory passes")
    _out(p, "figures/bench")
    p.set_defaults(func=handlers["bench_attention"])
    p = _command(bsub, "lengths", "time per generated token against position, to 8,192 tokens, per variant",
                 "HF's model.generate, tellnorm's generate, + norm tracing, + ALRR, + ERSS (paper settings) on the "
                 "same weights, each token timed: per-window medians, each variant's overhead over tellnorm and its "
                 "growth from the first window to the last, and peak memory per length.",
                 "tellnorm bench lengths --lengths 512 2048 --repeats 1")
    p.add_argument("--config", default="qwen3-0.6b", help="model shape (random init): qwen3-0.6b or organism")
    p.add_argument("--layers", type=int, default=2, help="number of layers (the shape's width)")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192], help="tokens generated per request")
    p.add_argument("--window", type=int, default=512, help="tokens per window of positions")
    p.add_argument("--variants", nargs="+", default=["hf-generate", "tellnorm", "tracing", "alrr", "erss"],
                   help="variants to run (hf-generate and tellnorm always)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    p.add_argument("--prompt-len", type=int, default=16, help="random prompt tokens")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's setting)")
    _out(p, "figures/bench")
    p.set_defaults(func=handlers["bench_lengths"])


def add_report(sub: Any, handlers: Handlers) -> None:
    """``tellnorm report``: the paper's tables across models, from run folders of ``tellnorm reproduce``."""
    p = _command(sub, "report", "the paper's result tables across models, merged from run folders",
                 "Reads the folders `tellnorm reproduce` wrote (one per model: accuracy.csv or organism_accuracy.csv, "
                 "evaluation.csv, correlation.csv, norm_profile.csv, claims.csv if any, manifest.json) and writes "
                 "cross_model_accuracy.csv, cross_model_spearman.csv, cross_model_techniques.csv (with the mean "
                 "over tasks), cross_model_claims.csv, the figures and REPORT.md. A folder missing a file fails "
                 "before anything is written.", "tellnorm report figures runs/qwen3-4b runs/llama-8b --out runs/report")
    p.add_argument("runs", nargs="+", metavar="DIR", help="run folders written by tellnorm reproduce, one per model")
    p.add_argument("--out", required=True, metavar="PATH",
                   help="output folder of the merged tables, figures and REPORT.md (not one of the run folders)")
    p.set_defaults(func=handlers["report"])


def build_parser(handlers: Handlers) -> argparse.ArgumentParser:
    """The whole ``tellnorm`` parser; ``handlers`` maps each command's name to the function that runs it."""
    parser = argparse.ArgumentParser(
        prog="tellnorm", formatter_class=HelpFormatter,
        description="The ℓ2 norm of hidden states as a signal for reasoning dynamics: tracing, SAEs, reasoning "
                    "features, the norm bound, interventions and test-time techniques (ALRR, ERSS, LRS).",
        epilog="example:\n  tellnorm reproduce --quick --out runs/quick\n\n"
               "`tellnorm COMMAND --help` describes each command and its options.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_reproduce(sub, handlers)
    add_organism(sub, handlers)
    add_profile(sub, handlers)
    add_sae(sub, handlers)
    add_features(sub, handlers)
    add_dashboard(sub, handlers)
    add_explore(sub, handlers)
    add_bounds_and_correlate(sub, handlers)
    add_intervene(sub, handlers)
    add_evaluate(sub, handlers)
    add_harness(sub)
    add_bench(sub, handlers)
    add_report(sub, handlers)
    return parser
