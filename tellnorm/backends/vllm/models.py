"""vLLM model classes with tellnorm's taps: the stock class plus where its decoder layers and attention are.

Every tapped architecture's decoder layer has vLLM's signature ``layer(positions, hidden, residual) ->
(hidden, residual)`` and defers the residual add to the next layer's fused norm, so the stream after layer L is
``hidden + residual`` (HF's decoder-layer output). The classes add no behaviour until a
:class:`~tellnorm.backends.vllm.session.Session` attaches its hooks (``Session.attach``), so an idle tellnorm model
runs exactly the stock forward.

``TellnormQwen3ForCausalLM`` and its siblings (one per :data:`~tellnorm.backends.vllm.plugin.STOCK_CLASSES` entry)
are made on first use: vLLM's registry imports a class by name, and only that architecture's vLLM module loads.
"""

from __future__ import annotations

import importlib
from typing import Any

from tellnorm.backends.vllm.plugin import STOCK_CLASSES, TAPPED_ARCHITECTURES


class TellnormTaps:
    """Where the taps go: the decoder layers in order and each layer's attention (which owns the paged KV cache)."""

    def tellnorm_layers(self) -> list:
        """The decoder layers in order (``self.model.layers``)."""
        return list(self.model.layers)

    @staticmethod
    def tellnorm_attention(layer: Any) -> Any:
        """The vLLM ``Attention`` module of decoder ``layer``, which owns its paged KV cache."""
        return layer.self_attn.attn


_CLASSES: dict[str, type] = {}
_ARCH_OF = {name: arch for arch, name in TAPPED_ARCHITECTURES.items()}


def __getattr__(name: str) -> type:
    """``TellnormXForCausalLM``: vLLM's stock class for HF architecture X with :class:`TellnormTaps` (made once)."""
    if name not in _ARCH_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _CLASSES:
        arch = _ARCH_OF[name]
        module, stock = STOCK_CLASSES[arch]
        base = getattr(importlib.import_module(f"vllm.model_executor.models.{module}"), stock)
        _CLASSES[name] = type(name, (TellnormTaps, base), {"__module__": __name__,
                                                           "__doc__": f"vLLM's {stock} ({arch}) with tellnorm's taps."})
    return _CLASSES[name]
