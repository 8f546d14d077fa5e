"""tellnorm: the ℓ2 norm of hidden states as a signal for reasoning dynamics in language models.

``import tellnorm as tn`` gives the paper's workflow in one namespace; each name loads its module on first use, so
the import stays instant and ``dir(tn)`` lists them all::

    model = tn.load_model("organism")                         # or a folder / hub name; backend="vllm"
    trace = tn.trace_generation(model, prompts)               # every layer's norm, per request and token
    profile = tn.layer_profile(trace.frame)                   # mean norm per layer with bootstrap CIs
    saes = tn.load_saes("organism", model)                    # {layer: sae_lens SAE}
    corpus = tn.contrast_corpus(model, 5)                     # the same problems in both modes
    reasoning, table = tn.reasoning_features(model, saes, corpus)
    check = tn.check_tokens(saes[6], states)                  # the norm bound, per token and feature
    edits = tn.build_edits(["alrr"], model, fixed=tau)        # ALRR / ERSS as observers
    gens = tn.generate(model, prompts, observers=edits)

The package has three layers (``tests/test_layers.py`` checks them): the **core** a notebook imports —
``backends`` (``base``, ``hf``, ``vllm``), ``generation``, ``norms``, ``thresholds``, ``thinking``, ``saes``,
``features``, ``bounds``, ``signals``, ``interventions``, ``techniques``; the **studies** that run the paper on a
model (``tellnorm.studies``) with the **organism** they default to (``tellnorm.organism``); and the **apps**
(``tellnorm.apps``: cli, reproduce, dashboards, explorer, harness, distributed, bench).
"""

from importlib import import_module

__version__ = "0.1.0"

# name -> the module that defines it, grouped in the paper's order.
_WORKFLOW = {
    # loading and generation
    "tellnorm.backends": ("load_model", "BACKENDS"),
    "tellnorm.backends.base": ("ModelAPI", "SUPPORTED_ARCHITECTURES", "HOOK_POINTS"),
    "tellnorm.generation": ("generate", "run_forward", "SamplingConfig", "Generation", "StepInfo", "LayerHooks"),
    "tellnorm.thinking": ("switch_for", "contrast_models"),
    # tracing and profiles
    "tellnorm.norms": ("NormTracer", "NormTrace", "trace_generation", "trace_forward", "layer_profile", "l2_norm"),
    "tellnorm.studies.corpus": ("contrast_corpus", "trace_both_modes", "ContrastCorpus"),
    # thresholds
    "tellnorm.thresholds": ("ThresholdConfig", "make_threshold", "calibrated_thresholds", "exact_threshold"),
    # SAEs and reasoning features
    "tellnorm.saes": ("load_saes", "validate_sae"),
    "tellnorm.features": ("collect_feature_sums", "contrast_masks", "contrast_table", "top_k_scores",
                          "reason_score_table", "reasoning_features", "check_features", "FeatureSums"),
    # the bound check
    "tellnorm.bounds": ("sae_geometry", "feature_bounds", "check_tokens", "collect_bounds", "BoundsObserver"),
    "tellnorm.signals": ("collect_signals", "SignalObserver"),
    "tellnorm.stats": ("bootstrap_ci", "spearman"),
    # edits and selections
    "tellnorm.interventions": ("Scale", "ClampNorm", "AddVector", "SAEFeatureEdit", "Edit", "EditRecord",
                               "AboveThreshold", "RandomFraction", "All", "Prompt", "Generated", "Mask", "AllOf",
                               "edit_summary"),
    # ALRR / ERSS / LRS and the baselines
    "tellnorm.techniques": ("ALRR", "ALRRConfig", "ERSS", "ERSSConfig", "LRSConfig", "build_edits",
                            "threshold_for", "firing_report"),
    "tellnorm.techniques.confidence": ("ConfidenceConfig", "majority_vote", "self_certainty"),
    # errors
    "tellnorm.errors": ("TellnormError",),
}
_EXPORTS = {name: module for module, names in _WORKFLOW.items() for name in names}
# Names that would be ambiguous at the top level, under a clearer one: (module, its name).
_ALIASES = {"lrs_statistics": ("tellnorm.techniques.lrs", "statistics_table"),
            "select_by_confidence": ("tellnorm.techniques.confidence", "select")}

__all__ = sorted(set(_EXPORTS) | set(_ALIASES)) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS or name in _ALIASES:
        module, attr = _ALIASES.get(name, (_EXPORTS.get(name), name))
        value = getattr(import_module(module), attr)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'tellnorm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return list(__all__)
