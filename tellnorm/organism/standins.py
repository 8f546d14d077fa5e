"""Stand-ins for real models and registry SAEs: random weights in the real architectures and the registries' own
file layouts, so the real-model code path (loading, validation, tracing, features) runs where the weights are absent.

Used by ``notebooks/05_real_model.ipynb`` and its test; nothing measured on a stand-in means anything about a model.

* :func:`tiny_model` — a random-init HF model of a real architecture (Qwen3, Llama, Qwen3.5) saved as a folder, with the
  organism's tokenizer and chat template (it has Qwen3's ``enable_thinking`` switch).
* :func:`qwen_scope_files` — Qwen-Scope's layout (``layer{L}.sae.pt``: ``W_enc [d_sae, d_in]``,
  ``W_dec [d_in, d_sae]``) in a folder named like the hub repository, so the release (and its top-k) is recognised.
* :func:`llama_scope_r1_files` — Llama-Scope-R1's layout (``<variant>/L{L}R/config.json`` +
  ``sae_weights.safetensors`` with nn.Linear-style weights and the log JumpReLU threshold), with the dataset norm the
  loader rescales by.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

QWEN_SCOPE_REPO = "SAE-Res-Qwen3-1.7B-Base-W32K-L0_50"  # a real Qwen-Scope release name: top-k 50
QWEN_SCOPE_3_5_REPO = "SAE-Res-Qwen3.5-2B-Base-W32K-L0_50"  # the Qwen3.5 release qwen-scope-3.5-2b-base-w32k-l50
LLAMA_SCOPE_R1_VARIANT = "800M-Slimpajama-0-OpenR1-Math-220k"  # fnlp/Llama-Scope-R1-Distill's variant folder
ARCHITECTURES = ("qwen3", "llama", "qwen3_5")


def tiny_model(folder: str | Path, arch: str = "qwen3", *, n_layers: int = 4, d_model: int = 128,
               seed: int = 0) -> Path:
    """Save a random-init ``arch`` model (float32, 4 query / 2 KV heads of size 32) and the organism's tokenizer.
    ``qwen3_5`` is Qwen3.5's hybrid: Gated DeltaNet linear attention (2 key / 4 value heads of size 32) with every
    fourth layer full attention, as the released models are built."""
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen3_5ForCausalLM,
        Qwen3_5TextConfig,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    from tellnorm.errors import TellnormError
    from tellnorm.organism.tokenizer import build_tokenizer

    if arch not in ARCHITECTURES:
        raise TellnormError(f"no stand-in for {arch!r}: choose one of {', '.join(ARCHITECTURES)}")
    tokenizer = build_tokenizer()
    config_class, model_class = {"qwen3": (Qwen3Config, Qwen3ForCausalLM),
                                 "llama": (LlamaConfig, LlamaForCausalLM),
                                 "qwen3_5": (Qwen3_5TextConfig, Qwen3_5ForCausalLM)}[arch]
    linear = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=d_model // 4,
                  linear_value_head_dim=d_model // 4) if arch == "qwen3_5" else {}
    config = config_class(vocab_size=len(tokenizer), hidden_size=d_model, num_hidden_layers=n_layers,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=d_model // 4,
                          intermediate_size=2 * d_model, max_position_embeddings=512,
                          pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                          **linear)
    config.architectures = [model_class.__name__]
    torch.manual_seed(seed)
    folder = Path(folder)
    model_class(config).to(torch.float32).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _random(generator, *shape, scale: float = 1.0):
    import torch

    return torch.randn(*shape, generator=generator) * scale


def qwen_scope_files(root: str | Path, d_in: int, layers: Iterable[int], *, d_sae: int = 512, seed: int = 0,
                     repo: str = QWEN_SCOPE_REPO) -> Path:
    """Random Qwen-Scope SAE files for ``layers`` in ``root/<repo>`` (a Qwen3 release by default,
    :data:`QWEN_SCOPE_3_5_REPO` for Qwen3.5: the same layout); returns that folder."""
    import torch

    folder = Path(root) / repo
    folder.mkdir(parents=True, exist_ok=True)
    for layer in layers:
        g = torch.Generator().manual_seed(seed + layer)
        torch.save({"W_enc": _random(g, d_sae, d_in, scale=d_in ** -0.5), "W_dec": _random(g, d_in, d_sae, scale=0.1),
                    "b_enc": _random(g, d_sae, scale=0.1), "b_dec": _random(g, d_in, scale=0.1)},
                   folder / f"layer{layer}.sae.pt")
    return folder


def llama_scope_r1_files(root: str | Path, d_in: int, layers: Iterable[int], *, d_sae: int = 512,
                         average_norm: float = 1.0, seed: int = 0) -> Path:
    """Random Llama-Scope-R1 SAE folders for ``layers`` under ``root/<variant>/L{L}R``; returns ``root``.

    The loader rescales inputs as for the real files: by the registry's ``norm_scaling_factor`` of that variant's
    layer, else by sqrt(d_in) / ``average_norm`` (the dataset norm lm-saes records in ``config.json``)."""
    import torch
    from safetensors.torch import save_file

    root = Path(root)
    for layer in layers:
        g = torch.Generator().manual_seed(seed + layer)
        folder = root / LLAMA_SCOPE_R1_VARIANT / f"L{layer}R"
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"encoder.weight": _random(g, d_sae, d_in, scale=d_in ** -0.5),
                   "encoder.bias": _random(g, d_sae, scale=0.1), "decoder.weight": _random(g, d_in, d_sae, scale=0.1),
                   "decoder.bias": _random(g, d_in, scale=0.1),
                   "log_jumprelu_threshold": torch.full((d_sae,), 0.1).log()}, folder / "sae_weights.safetensors")
        config = {"d_model": d_in, "expansion_factor": d_sae // d_in,
                  "hook_point_in": f"blocks.{layer}.hook_resid_post",
                  "dataset_average_activation_norm": {"in": average_norm}}
        (folder / "config.json").write_text(json.dumps(config))
    return root
