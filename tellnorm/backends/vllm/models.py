"""vLLM model classes with tellnorm's taps: the stock class plus where its decoder layers and attention are.

How a decoder layer hands on the stream is a per-family rule (:data:`~tellnorm.backends.vllm.plugin.LAYER_RULES`):
most of vLLM's layers have the signature ``layer(positions, hidden, residual) -> (hidden, residual)`` and defer the
residual add to the next layer's fused norm, so the stream after layer L is ``hidden + residual`` (HF's
decoder-layer output; :class:`TellnormTaps`); a few add it themselves and hand on the whole stream as their first
(or only) output, any second output being the layer's internal state (:class:`CompleteStreamTaps`); gpt-oss takes
its arguments in another order (:class:`HiddenFirstTaps`). The classes
add no behaviour until a
:class:`~tellnorm.backends.vllm.session.Session` attaches its hooks (``Session.attach``), so an idle tellnorm model
runs exactly the stock forward.

``TellnormQwen3ForCausalLM`` and its siblings (one per :data:`~tellnorm.backends.vllm.plugin.STOCK_CLASSES` entry)
are made on first use: vLLM's registry imports a class by name, and only that architecture's vLLM module loads.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tellnorm.backends.vllm.plugin import INIT_FIXES, LAYER_RULES, STOCK_CLASSES, TAPPED_ARCHITECTURES

if TYPE_CHECKING:
    import torch


class TellnormTaps:
    """Where the taps go — the decoder layers in order and each layer's attention (which owns the paged KV cache) —
    and how a layer hands on the stream: ``(hidden, residual)`` with the add deferred, the stream their sum."""

    def tellnorm_stream(self, output: Any) -> torch.Tensor:
        """The stream ``[tokens, d_model]`` after a decoder layer, from the layer's ``output``."""
        hidden, residual = output
        return hidden if residual is None else hidden + residual

    def tellnorm_with_stream(self, output: Any, stream: torch.Tensor) -> Any:
        """The layer's output carrying ``stream`` instead (the residual folded in)."""
        import torch

        return stream, torch.zeros_like(stream)

    def tellnorm_stream_in(self, args: tuple) -> torch.Tensor:
        """The stream entering a decoder layer (a copy), from its forward's positional ``args``."""
        _, hidden, residual = args[:3]
        return hidden.clone() if residual is None else hidden + residual

    def tellnorm_rerun(self, layer: Any, positions: torch.Tensor, stream: torch.Tensor) -> torch.Tensor:
        """Decoder ``layer`` run again (its ``forward``, so no hook re-enters) on ``stream``; the stream after it."""
        return self.tellnorm_stream(layer.forward(positions, stream, None))

    def tellnorm_layers(self) -> list:
        """The decoder layers in order (``self.model.layers``)."""
        return list(self.model.layers)

    @staticmethod
    def tellnorm_attention(layer: Any) -> Any:
        """The vLLM ``Attention`` module of decoder ``layer``, which owns its paged KV cache."""
        return layer.self_attn.attn


class CompleteStreamTaps(TellnormTaps):
    """Layers that add the residual themselves: the stream is the first output (Granite's only one); a second output
    is the layer's mid-block state, which the next layer overwrites (EXAONE 4) or never takes (StableLM)."""

    def tellnorm_stream(self, output: Any) -> torch.Tensor:
        """The layer's first (or only) output."""
        return output[0] if isinstance(output, tuple) else output

    def tellnorm_with_stream(self, output: Any, stream: torch.Tensor) -> Any:
        """The output with ``stream`` as its first (or only) part."""
        return (stream, *output[1:]) if isinstance(output, tuple) else stream

    def tellnorm_stream_in(self, args: tuple) -> torch.Tensor:
        """The layer's ``hidden`` argument (a copy)."""
        return args[1].clone()

    def tellnorm_rerun(self, layer: Any, positions: torch.Tensor, stream: torch.Tensor) -> torch.Tensor:
        """As :meth:`TellnormTaps.tellnorm_rerun`, passing ``residual=None`` only to layers that take one."""
        takes_residual = _takes_residual(type(layer))
        output = layer.forward(positions, stream, None) if takes_residual else layer.forward(positions, stream)
        return self.tellnorm_stream(output)


@functools.cache
def _takes_residual(layer_class: type) -> bool:
    """Whether a decoder layer class's ``forward`` takes a ``residual`` argument (read once per class: ALRR re-runs
    layers every step)."""
    return "residual" in inspect.signature(layer_class.forward).parameters


class HiddenFirstTaps(TellnormTaps):
    """gpt-oss: ``layer(hidden, positions, residual) -> (hidden, residual)``, attention at ``layer.attn.attn``."""

    @staticmethod
    def tellnorm_attention(layer: Any) -> Any:
        """The vLLM ``Attention`` inside gpt-oss's attention block."""
        return layer.attn.attn

    def tellnorm_stream_in(self, args: tuple) -> torch.Tensor:
        """``hidden + residual`` from ``(hidden, positions, residual)``."""
        hidden, _, residual = args[:3]
        return hidden.clone() if residual is None else hidden + residual

    def tellnorm_rerun(self, layer: Any, positions: torch.Tensor, stream: torch.Tensor) -> torch.Tensor:
        """As :meth:`TellnormTaps.tellnorm_rerun`, in gpt-oss's argument order."""
        return self.tellnorm_stream(layer.forward(stream, positions, None))


RULE_CLASSES = {"deferred-add": TellnormTaps, "complete-stream": CompleteStreamTaps, "hidden-first": HiddenFirstTaps}


def xielu_in_model_dtype(model: Any) -> None:
    """Apertus: vLLM builds each xIELU activation's α_p, α_n, β and ε in bfloat16 whatever the engine's dtype, where
    HF builds them in the model's; in a float32 engine the loaded α_p, α_n were rounded to bfloat16 and every layer's
    norm came out ~1e-3 from HF's. Rebuilt in the engine's dtype (vLLM's default dtype while the model is built), β
    and ε from xIELU's own defaults, which Apertus uses; the weights that load next fill α_p and α_n."""
    import torch
    from vllm.model_executor.layers.activation import XIELU

    dtype = torch.get_default_dtype()
    defaults = inspect.signature(XIELU.__init__).parameters
    for module in model.modules():
        if isinstance(module, XIELU) and module.alpha_p.dtype != dtype:
            device = module.alpha_p.device
            module.alpha_p = torch.nn.Parameter(module.alpha_p.detach().to(dtype), requires_grad=False)
            module.alpha_n = torch.nn.Parameter(module.alpha_n.detach().to(dtype), requires_grad=False)
            module.beta = torch.tensor(defaults["beta"].default, dtype=dtype, device=device)
            module.eps = torch.tensor(defaults["eps"].default, dtype=dtype, device=device)
            module._beta_scalar, module._eps_scalar = float(module.beta), float(module.eps)


FIX_FUNCTIONS = {"xielu-in-model-dtype": xielu_in_model_dtype}
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
        taps = RULE_CLASSES[LAYER_RULES.get(arch, "deferred-add")]
        body = {"__module__": __name__, "forward": _announcing(base.forward),
                "__doc__": f"vLLM's {stock} ({arch}) with tellnorm's taps."}
        if arch in INIT_FIXES:
            body["__init__"] = _fixed_after(base.__init__, FIX_FUNCTIONS[INIT_FIXES[arch]])
        _CLASSES[name] = type(name, (taps, base), body)
    return _CLASSES[name]


def _fixed_after(init: Callable[..., Any], fix: Callable[[Any], None]) -> Callable[..., Any]:
    """The stock ``__init__``, then ``fix`` on the built model (stock signature kept: vLLM reads it)."""

    @functools.wraps(init)
    def run(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        fix(self)

    return run


def _announcing(forward: Callable[..., Any]) -> Callable[..., Any]:
    """The stock ``forward``, first handing its arguments to the attached session's ``tellnorm_step_start`` (if any).

    A wrapper, not a forward pre-hook: vLLM's compile decorator gives some top-level classes (ERNIE 4.5) a
    ``__call__`` that goes straight to ``forward``, past module hooks. ``functools.wraps`` keeps the stock signature
    for vLLM's introspection."""

    @functools.wraps(forward)
    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        start = self.__dict__.get("tellnorm_step_start")
        if start is not None:
            start(self, args, kwargs)
        return forward(self, *args, **kwargs)

    return run
