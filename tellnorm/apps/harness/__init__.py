"""lm-evaluation-harness integration: tellnorm as an lm-eval model type, ``--model tellnorm``.

* :mod:`.model` — :class:`~tellnorm.apps.harness.model.TellnormLM`: ``generate_until`` on either tellnorm backend (HF or
  vLLM) with any decode-time technique (ALRR, ERSS, ALRR+ERSS) and, optionally, selection over N samples (LRS or its
  compute-matched baselines), recording per-request norm statistics and firing counts. Loglikelihood requests are
  refused with one line (scoring under a decode-time edit is not defined here).
* :mod:`.tasks` — the local organism task's data (a JSONL of test problems) and answer checkers: the organism's own
  parser for the organism task, math-verify for math tasks that bring no checker.
* :mod:`.cli` — ``python -m tellnorm.apps.harness ARGS``: lm-eval's own command line with the model type registered,
  per-request statistics written beside lm-eval's results, and one-line errors.

How lm-eval finds the model. lm-eval 0.4.13 has no plugin entry point for model types: its registry holds the
built-in ``MODEL_MAPPING`` plus whatever was registered by an import (``@register_model``) before ``get_model``
runs. Importing this package registers ``tellnorm`` (lazily: the model module loads on first use). Three ways in:

1. ``python -m tellnorm.apps.harness --model tellnorm --model_args ... --tasks ...`` (any task);
2. ``lm_eval --model tellnorm ... --tasks <path to one of tellnorm's task YAMLs>`` — the literal lm-eval command
   works for tellnorm's own tasks, because lm-eval's CLI resolves a YAML path's ``!function`` entries (which import
   ``tellnorm.apps.harness.tasks``, hence this package) before it creates the model; with a task *name* lm-eval creates
   the model first and answers "no model for this name found";
3. Python: ``import tellnorm.apps.harness`` then ``lm_eval.simple_evaluate(model="tellnorm", ...)``.
"""

from __future__ import annotations

from pathlib import Path

MODEL_NAME = "tellnorm"
TASK_DIR = Path(__file__).resolve().parents[2] / "data" / "lm_eval"
ORGANISM_TASK = "tellnorm_organism"
ORGANISM_TASK_YAML = TASK_DIR / f"{ORGANISM_TASK}.yaml"
MATH_TASK = "tellnorm_math"
MATH_TASK_YAML = TASK_DIR / f"{MATH_TASK}.yaml"


def register() -> bool:
    """Register ``tellnorm`` in lm-eval's model registry (idempotent); False when lm-eval is not installed."""
    try:
        # The built-in models first: lm-eval imports its own MODEL_MAPPING only into an *empty* registry, so
        # registering tellnorm alone would hide `--model hf` and the rest.
        import lm_eval.models  # noqa: F401
        from lm_eval.api.registry import model_registry
    except ImportError:
        return False
    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target="tellnorm.apps.harness.model:TellnormLM")
    return True


register()
