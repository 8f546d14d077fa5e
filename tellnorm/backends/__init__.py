"""Model backends: what runs the forward passes that tellnorm observes and edits.

* :mod:`.base` — what every backend shares: :class:`~.base.ModelAPI`, the architecture table, the BOS rule, subjects.
* :mod:`.hf` — HF's modules under a TransformerLens bridge, HF's KV cache, TL hooks. Every analysis runs here; it is
  the reference.
* :mod:`.vllm` — vLLM's engine (its CPU build on machines without a GPU) with the same per-request observers, edits
  and techniques, tested against the ``hf`` backend.

:func:`load_model` picks one; user code does not change with it.
"""

from __future__ import annotations

from typing import Any

from tellnorm.backends.base import ModelAPI, subjects
from tellnorm.errors import TellnormError

BACKENDS = ("hf", "vllm")
DEFAULT_MODEL = "organism"  # the model organism tellnorm trains itself (tellnorm.organism, registered as a subject)


def load_model(spec: Any = DEFAULT_MODEL, *, device: str = "cpu", dtype: str | None = None, backend: str = "hf",
               attn_implementation: str | None = None, **engine_options: Any) -> ModelAPI:
    """Load ``spec`` on ``backend``: a registered subject (``"organism"``), a local HF folder, a hub name in the
    local cache, or an in-memory ``(model, tokenizer)`` pair (HF only); a loaded model is returned as it is.

    ``backend="vllm"`` runs it in vLLM (:func:`tellnorm.backends.vllm.load_vllm_model`; ``engine_options`` go
    there): generation, tracing, edits and techniques take the same calls on either backend. ``dtype``: float32
    by default, except on vLLM on a GPU, where the model's own (bfloat16/float16). ``attn_implementation``
    (HF only): the attention kernel, None for HF's default (``sdpa``; see :mod:`tellnorm.backends.fastpath`)."""
    if isinstance(spec, ModelAPI):
        return spec
    if backend not in BACKENDS:
        raise TellnormError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    subject = subjects().get(spec) if isinstance(spec, str) else None
    if backend == "vllm":
        if attn_implementation is not None:
            raise TellnormError("attn_implementation applies to backend='hf' only: vLLM picks its attention backend")
        from tellnorm.backends.vllm import load_vllm_model

        return load_vllm_model(spec, dtype=dtype, subject=subject, **engine_options)
    if engine_options:
        raise TellnormError(f"engine options {sorted(engine_options)} apply to backend='vllm' only")
    from tellnorm.backends.hf import load_hf_model

    return load_hf_model(spec, device=device, dtype=dtype or "float32", subject=subject,
                         attn_implementation=attn_implementation)
