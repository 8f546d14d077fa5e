"""vLLM model classes with tellnorm's taps: the stock class plus where its decoder layers and attention are.

Every tapped architecture's decoder layer has vLLM's signature ``layer(positions, hidden, residual) ->
(hidden, residual)`` and defers the residual add to the next layer's fused norm, so the stream after layer L is
``hidden + residual`` (HF's decoder-layer output). The classes add no behaviour until a
:class:`~tellnorm.backends.vllm.session.Session` attaches its hooks (``Session.attach``), so an idle tellnorm model
runs exactly the stock forward.
"""

from __future__ import annotations

from typing import Any

from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM


class TellnormTaps:
    """Where the taps go: the decoder layers in order and each layer's attention (which owns the paged KV cache)."""

    def tellnorm_layers(self) -> list:
        """The decoder layers in order (``self.model.layers``)."""
        return list(self.model.layers)

    @staticmethod
    def tellnorm_attention(layer: Any) -> Any:
        """The vLLM ``Attention`` module of decoder ``layer``, which owns its paged KV cache."""
        return layer.self_attn.attn


class TellnormQwen3ForCausalLM(TellnormTaps, Qwen3ForCausalLM):
    """vLLM's Qwen3 model with tellnorm's taps."""


class TellnormQwen2ForCausalLM(TellnormTaps, Qwen2ForCausalLM):
    """vLLM's Qwen2 model with tellnorm's taps."""


class TellnormLlamaForCausalLM(TellnormTaps, LlamaForCausalLM):
    """vLLM's Llama model with tellnorm's taps."""
