"""Interventions: composable residual-stream edits (PAPER §4's causal tests).

* :mod:`.selection` — which tokens: all, prompt, generated, a mask, norm above the layer's threshold (any mode of
  :mod:`tellnorm.thresholds`), a seeded random fraction; per request, never per batch slot.
* :mod:`.edits` — what to do to them: scale, clamp the norm, add a vector, set SAE features with the error term
  kept; observers for :func:`tellnorm.generation.generate` and :func:`tellnorm.generation.run_forward` that record
  every decision.

The suppression study that uses them (``tellnorm intervene``: high-norm vs random matched suppression,
amplification, steering along the thinking direction, clamping reasoning features) is
:mod:`tellnorm.studies.suppression`.
"""

from tellnorm.interventions.edits import (
    AddVector,
    ClampNorm,
    Edit,
    EditRecord,
    SAEFeatureEdit,
    Scale,
    edit_summary,
    edited_tokens,
    tau_fraction,
)
from tellnorm.interventions.selection import (
    AboveThreshold,
    All,
    AllOf,
    Generated,
    Mask,
    Prompt,
    RandomFraction,
    Selection,
    token_uniforms,
)

__all__ = [
    "AboveThreshold", "AddVector", "All", "AllOf", "ClampNorm", "Edit", "EditRecord", "Generated", "Mask", "Prompt",
    "RandomFraction", "SAEFeatureEdit", "Scale", "Selection", "edit_summary", "edited_tokens", "tau_fraction",
    "token_uniforms",
]
