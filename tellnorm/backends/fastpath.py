"""How tellnorm runs a model under the TransformerLens bridge at the speed of the raw HF model.

The bridge keeps HF's numerics and gives every model one hook namespace, but as booted it costs speed in two ways,
both for hook points tellnorm's studies do not read (they hook the residual stream):

1. **Attention kernel.** The bridge boots every model with ``config._attn_implementation = "eager"`` and its
   attention modules re-implement attention as explicit matrix products so that ``hook_attn_scores`` and
   ``hook_pattern`` can fire: a ``[batch, heads, T, T]`` score matrix per layer (quadratic prefill memory) and a slower
   kernel at every step. :func:`use_model_kernel` gives the model its own kernel back (``sdpa`` by default,
   FlashAttention where the user loaded it): each attention bridge delegates to the HF module it wraps
   (``hook_in`` -> HF's forward -> ``hook_out``, TransformerLens's own ``AttentionBridge.forward``).
2. **Per-module dispatch.** A bridged decoder layer calls some 60 wrapper modules and hook points per step; on a
   small model or a GPU decode step that Python work costs as much as the layer itself (measured 2.2x a raw HF
   decode step on a 28-layer Qwen3-0.6B shape on an H200, and on the organism on a CPU). :func:`use_raw_layers`
   lets each decoder-layer bridge run the HF layer it wraps directly — between the block's own ``hook_in`` and
   ``hook_out`` (``blocks.L.hook_resid_pre`` / ``hook_resid_post``) — whenever no hook is set inside the block.

3. **Grouped-query attention on CPU.** HF's sdpa integration copies every key/value head ``groups`` times
   (``repeat_kv``) before torch's kernel whenever a mask is passed (always, under left padding), because CUDA's fused
   kernels would fall back to the math kernel otherwise. torch's CPU kernel takes the grouped heads as they are
   (``enable_gqa``) and returns the same bits (tested on every dtype, masked and causal, prefill and decode); the
   copy was a quarter of a decode step on the organism. :data:`GQA_SDPA` is HF's sdpa with that one difference on
   CPU tensors, registered through transformers' own ``AttentionInterface`` (HF's sdpa anywhere else); a model loaded
   with ``sdpa`` runs it and still reports ``sdpa``.

Both decide per call, so the whole hook namespace keeps working: a hook on an attention internal (scores,
pattern, rotated q/k, ...) runs that layer's attention through the bridge's eager re-implementation for that call
and says so once per hook kind; any hook inside a block (``attn.hook_z``, ``hook_resid_mid``, ``mlp.hook_post``, ...)
runs that block through the bridge for that call; TransformerLens's compatibility mode, whose processed weights live
in the bridge's modules, keeps the bridge's forward throughout. Numerics do not change: the raw layer is the module
the bridge delegates to. Architectures whose numerics need eager attention keep it (``Family.attn_implementation``
in :mod:`tellnorm.backends.base`), and ones whose HF layers cannot run against the bridge's cache (MLA) keep the
bridge.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# Hook points of an attention bridge that its own forward fires around HF's module; every other hook point it owns
# (scores, pattern, rotated q/k, normed q/k, cos/sin, split inputs, per-head results) exists only in the
# re-implementation.
DELEGATED_HOOKS = frozenset({"hook_in", "hook_out"})
# Bridge settings that only the re-implementation honours (per-head inputs and results).
REIMPLEMENTATION_SETTINGS = ("use_split_qkv_input", "use_attn_in", "use_attn_result")

GQA_SDPA = "tellnorm_sdpa"  # the attn_implementation name of HF's sdpa with native grouped heads on CPU

_FAST_CLASSES: dict[tuple[type, type], type] = {}
_WARNED: set[str] = set()


def hooked_internals(attention: Any) -> list[str]:
    """Names of ``attention``'s own hook points (other than ``hook_in``/``hook_out``) that have a hook now."""
    from transformer_lens.hook_points import HookPoint

    return [name for name, child in attention._modules.items()
            if isinstance(child, HookPoint) and name not in DELEGATED_HOOKS
            and (child._forward_hooks or child._backward_hooks or child._forward_pre_hooks)]


class ModelKernelMixin:
    """Mixin placed before an attention bridge's class: the HF module's own kernel unless a call needs the
    bridge's re-implementation (eager kernel set on the config, hooks on attention internals, per-head settings)."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """HF's attention forward between ``hook_in`` and ``hook_out``, or the bridge's re-implementation."""
        from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

        hf_config = getattr(self.original_component, "config", None)
        if self.compatibility_mode or getattr(hf_config, "_attn_implementation", "eager") == "eager":
            return super().forward(*args, **kwargs)  # compatibility mode: processed weights live in the bridge
        if any(getattr(self.config, name, False) for name in REIMPLEMENTATION_SETTINGS):
            return super().forward(*args, **kwargs)
        hooked = hooked_internals(self)
        if hooked:
            for name in hooked:
                if name not in _WARNED:
                    _WARNED.add(name)
                    warnings.warn(f"a hook on attn.{name} needs the bridge's eager attention: the hooked layers run "
                                  f"it for these calls (the {hf_config._attn_implementation} kernel otherwise)",
                                  stacklevel=2)
            return super().forward(*args, **kwargs)
        return AttentionBridge.forward(self, *args, **kwargs)


def _fast_class(cls: type, mixin: type) -> type:
    if (cls, mixin) not in _FAST_CLASSES:
        _FAST_CLASSES[cls, mixin] = type(f"{mixin.__name__.removesuffix('Mixin')}{cls.__name__}", (mixin, cls), {})
    return _FAST_CLASSES[cls, mixin]


def gqa_sdpa_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """HF's sdpa attention (``query [batch, heads, q, head_dim]``, ``key``/``value [batch, kv_heads, k, head_dim]``
    -> ``[batch, q, heads, head_dim]``) with the key/value heads passed to torch's CPU kernel ungrouped
    (``enable_gqa``) instead of copied; every other case (CUDA, no grouping, position bias, paged cache, attention
    weights asked for, a causal prefill over a longer cache) is HF's own function."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_length, kv_length = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = q_length > 1 and attention_mask is None and causal
    if (getattr(module, "num_key_value_groups", 1) == 1 or query.device.type != "cpu"
            or kwargs.get("position_bias") is not None or kwargs.get("cache") is not None
            or kwargs.get("output_attentions", False) or (causal and kv_length > q_length)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           dropout_p=dropout, scale=scaling, is_causal=causal,
                                                           enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def register_gqa_sdpa() -> None:
    """Register :func:`gqa_sdpa_attention` (and HF's sdpa mask) under :data:`GQA_SDPA` with transformers."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(GQA_SDPA, gqa_sdpa_attention)
    AttentionMaskInterface.register(GQA_SDPA, sdpa_mask)


def use_model_kernel(bridge: Any, hf_model: Any, kernel: str) -> str:
    """Run ``hf_model``'s attention with ``kernel`` (an HF ``attn_implementation``) under ``bridge``; returns it.

    ``"eager"`` keeps the bridge as booted. Otherwise the HF config (and a nested ``text_config``) gets ``kernel`` back
    (``sdpa`` as :data:`GQA_SDPA`, the same numbers) and every attention bridge that re-implements attention delegates
    to its HF module."""
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    if kernel == "eager":
        return kernel
    configs = [hf_model.config, getattr(hf_model.config, "text_config", None)]
    for module in hf_model.modules():
        if isinstance(module, AttentionBridge) and type(module).forward is not AttentionBridge.forward:
            configs.append(getattr(module.original_component, "config", None))
            if not isinstance(module, ModelKernelMixin):
                module.__class__ = _fast_class(type(module), ModelKernelMixin)
    if kernel == "sdpa":
        register_gqa_sdpa()
    for config in configs:
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = GQA_SDPA if kernel == "sdpa" else kernel
    return kernel


# ------------------------------------------------------------------------------------------- raw decoder layers

def unwrap(module: Any) -> Any:
    """A shallow copy of ``module`` whose TransformerLens bridge children are replaced by the HF modules they wrap
    (recursively): the same parameters, the same hook dictionaries, HF's own forward, no hook points."""
    module = getattr(module, "original_component", module)
    clone = copy.copy(module)
    clone._modules = {name: unwrap(child) if child is not None else None
                      for name, child in module._modules.items()}
    return clone


class RawLayerMixin:
    """Mixin placed before a decoder-layer bridge's class: the wrapped HF layer between ``hook_in`` and ``hook_out``
    unless a hook is set inside the block, or the model was loaded without raw layers."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The raw HF layer between the block's ``hook_in`` and ``hook_out``, or the bridge's forward."""
        raw = self.__dict__.get("_tellnorm_raw")
        if raw is None or self.compatibility_mode or self._tellnorm_inner_hooked():
            return super().forward(*args, **kwargs)
        if self.__dict__.get("_stop_at_layer_idx") is not None:  # bridge(..., stop_at_layer=k) sets it
            self._check_stop_at_layer(*args, **kwargs)
        args, kwargs = self._hook_input_hidden_states(args, kwargs)
        accepted = self.__dict__["_tellnorm_accepted"]
        if accepted is not None:  # the HF layer takes no **kwargs: pass what it names, as the bridge does
            skip = set(accepted[: len(args)])
            kwargs = {k: v for k, v in kwargs.items() if k in accepted and k not in skip}
        return self._apply_output_hook(raw(*args, **kwargs),
                                       force_tuple_for_bare_tensor=self._is_standalone_hidden_state_call(args, kwargs))

    def _tellnorm_inner_hooked(self) -> bool:
        """Whether a hook is set on a hook point inside the block, or on one of its bridge modules (beyond the
        capture hooks TransformerLens itself installs). Reads dictionaries collected once: a few microseconds."""
        if any(self.__dict__["_tellnorm_hook_dicts"]):
            return True
        hooked = [hooks for hooks in self.__dict__["_tellnorm_component_hooks"] if hooks]
        if not hooked:
            return False
        own = {handle.id for handle in getattr(self, "_capture_hook_handles", ())}
        return any(key not in own for hooks in hooked for key in hooks)


def use_raw_layers(hf_model: Any) -> int:
    """Let every decoder-layer bridge of ``hf_model`` run its HF layer directly when no hook is set inside it (see
    the module's docstring); returns how many layers can. The raw copies share parameters but are made now: a module
    replaced later (an adapter, say) reaches them when this is called again."""
    from transformer_lens.hook_points import HookPoint
    from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent
    from transformer_lens.model_bridge.generalized_components.block import BlockBridge

    count = 0
    for block in hf_model.modules():
        if not isinstance(block, BlockBridge) or block.original_component is None:
            continue
        if any(getattr(block.config, name, False) for name in REIMPLEMENTATION_SETTINGS):
            continue  # per-head inputs/results: only the bridge's modules compute them
        inner = [m for m in block.modules() if m is not block and m is not block.hook_in and m is not block.hook_out]
        raw = unwrap(block)
        parameters = inspect.signature(raw.forward).parameters
        takes_any = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        # plain attributes, not submodules: the raw copy must not appear in modules() or the state dict
        block.__dict__["_tellnorm_raw"] = raw
        block.__dict__["_tellnorm_accepted"] = None if takes_any else list(parameters)
        # torch mutates these dictionaries in place when hooks come and go, so they are collected once
        components = [m for m in inner if isinstance(m, GeneralizedComponent)]
        block.__dict__["_tellnorm_hook_dicts"] = [
            hooks for m in inner if isinstance(m, HookPoint)
            for hooks in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks)]
        block.__dict__["_tellnorm_component_hooks"] = [
            hooks for m in components for hooks in (m._forward_hooks, m._forward_pre_hooks)]
        if not isinstance(block, RawLayerMixin):
            block.__class__ = _fast_class(type(block), RawLayerMixin)
        count += 1
    return count


def use_bridge_layers(hf_model: Any) -> None:
    """Undo :func:`use_raw_layers`: every decoder-layer bridge of ``hf_model`` runs the bridge's own forward again (as
    TransformerLens boots it; for comparisons and debugging)."""
    for block in hf_model.modules():
        if isinstance(block, RawLayerMixin):
            block.__dict__["_tellnorm_raw"] = None
