"""Model backends: what runs the forward passes that tellnorm observes and edits.

* ``hf`` — :mod:`tellnorm.models` + :mod:`tellnorm.generation`: HF's modules under a TransformerLens bridge, HF's KV
  cache, TL hooks. Every analysis runs here; it is the reference.
* ``vllm`` — :mod:`tellnorm.backends.vllm`: vLLM's engine (its CPU build on machines without a GPU) with the same
  per-request observers, edits and techniques, tested against the ``hf`` backend.

``tellnorm.models.load_model(spec, backend=...)`` picks one; user code does not change with it.
"""
