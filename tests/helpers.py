"""Test helpers: tiny random models that share the organism's tokenizer and chat template."""

from __future__ import annotations


def tiny_organism_like(n_layers: int = 3, d_model: int = 64, seed: int = 0):
    """A random-init Qwen3 with the organism's tokenizer, wrapped by tellnorm's backend."""
    import torch
    from transformers import Qwen3ForCausalLM

    from tellnorm.models import load_model
    from tellnorm.organism.tokenizer import build_tokenizer
    from tellnorm.organism.train import OrganismModelConfig

    tok = build_tokenizer()
    shape = OrganismModelConfig(n_layers=n_layers, d_model=d_model, n_heads=4, n_kv_heads=2, head_dim=16, d_mlp=128)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(shape.hf_config(len(tok), tok.pad_token_id, tok.eos_token_id))
    return load_model((model, tok))


def organism_prompts(model, n: int, thinking: bool = True, seed: int = 0) -> list[list[int]]:
    """``n`` chat prompts of different lengths (difficulties 1..8)."""
    import random

    from tellnorm.organism import task

    rng = random.Random(seed)
    problems = [task.make_problem(rng, 1 + i % task.MAX_DIFFICULTY) for i in range(n)]
    return [model.encode(model.chat_prompt(p.prompt_text(), thinking=thinking)) for p in problems]


def active_hook_count(model) -> int:
    """Forward hooks currently registered anywhere in the bridge (TransformerLens hook points)."""
    unique = {id(hp): hp for hp in model.bridge.hook_dict.values()}  # aliases share one HookPoint
    return sum(len(hp.fwd_hooks) for hp in unique.values())


def hf_layer_norms_float64(model, batch):
    """Reference independent of TransformerLens: forward hooks on HF's own decoder layers, ‖h‖ in float64.

    ``batch``: equal-length token-id lists. Returns a tensor ``[n_layers, batch, seq]``."""
    import torch

    outputs = {}
    handles = [layer.register_forward_hook(lambda mod, inp, out, i=i: outputs.__setitem__(
        i, (out[0] if isinstance(out, tuple) else out).detach()))
        for i, layer in enumerate(model.hf_model.model.layers)]
    try:
        with torch.no_grad():
            model.hf_model(torch.tensor(batch), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return torch.stack([outputs[i].double().norm(dim=-1) for i in range(len(outputs))])
