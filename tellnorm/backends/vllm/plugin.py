"""vLLM's ``general_plugins`` entry point (``pyproject.toml``): registers tellnorm's model classes by name.

vLLM calls :func:`register` in every process that builds an engine, before it resolves the architecture, so a
model selected with ``hf_overrides={"architectures": ["Tellnorm..."]}`` loads tellnorm's class — no patching.
"""

from __future__ import annotations

# HF architecture -> the tellnorm class that runs it in vLLM (tellnorm.backends.vllm.models).
TAPPED_ARCHITECTURES = {
    "Qwen3ForCausalLM": "TellnormQwen3ForCausalLM",
    "Qwen2ForCausalLM": "TellnormQwen2ForCausalLM",
    "LlamaForCausalLM": "TellnormLlamaForCausalLM",
}


def register() -> None:
    """Register each class of :data:`TAPPED_ARCHITECTURES` with vLLM's ``ModelRegistry`` (once per process)."""
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for name in TAPPED_ARCHITECTURES.values():
        if name not in supported:
            ModelRegistry.register_model(name, f"tellnorm.backends.vllm.models:{name}")
