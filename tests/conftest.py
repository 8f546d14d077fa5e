"""Shared test fixtures: tiny random-init HF causal LMs (Qwen2, Qwen3, Llama) with a small word-level tokenizer.

Everything runs offline on CPU. Builders are plain functions (importable as ``from conftest import ...``) and are
also exposed as session-scoped fixtures that cache their results:

* ``tiny_model_dir(arch="qwen3", n_layers=3, seed=0) -> Path``: a saved HF folder (config.json, model.safetensors,
  tokenizer files); the same arguments give the same folder for the whole session. Treat it as read-only; copy it
  (``shutil.copytree``) before corrupting or editing files.
* ``tiny_loaded_model(arch="qwen3", n_layers=3) -> LoadedModel``: ``tellnorm.backends.load_model`` of that folder,
  shared for the session; tests must leave no hooks on it (``run_with_cache``/``bridge.hooks(...)`` clean up).
* ``hf_reference(arch="qwen3", n_layers=3) -> PreTrainedModel``: an independent sdpa-attention HF copy of that folder,
  to compare tellnorm's activations against; never handed to tellnorm.
* ``tiny_hf_pair(arch="qwen3", n_layers=3, seed=0) -> (model, tokenizer)``: a fresh in-memory pair (not cached) with
  the same weights as ``tiny_model_dir`` for the same arguments.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub read it
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import pytest  # noqa: E402

TINY_ARCHS = ("qwen2", "qwen3", "llama")
TINY_DIMS = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
                 max_position_embeddings=256)
# Larger than HF's default 0.02 so activations are O(1) and a 1e-5 tolerance is a meaningful check.
TINY_INIT_RANGE = 0.2

SPECIAL = ("<pad>", "<unk>", "<s>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
WORDS = ("\n", "system", "user", "assistant") + tuple(f"w{i}" for i in range(89))  # vocab of 100
PAD, UNK, BOS = "<pad>", "<unk>", "<s>"

# Qwen3's chat template reduced to what the tiny vocabulary can spell (role blocks, enable_thinking switch).
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
# Llama-3-style: the template itself writes BOS, as real Llama/DeepSeek-R1-Distill-Llama templates do.
LLAMA_CHAT_TEMPLATE = "{{- bos_token }}" + QWEN_CHAT_TEMPLATE


def build_tiny_tokenizer(bos: bool = False, chat_template: str | None = None):
    """A word-level ``PreTrainedTokenizerFast``: words split on spaces, newline a token; eos ``<|im_end|>``."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(" +"), behavior="removed"), pre_tokenizers.Split("\n", behavior="isolated")]
    )
    kwargs = dict(bos_token=BOS) if bos else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token=UNK,
        pad_token=PAD,
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>", "<think>", "</think>"],
        chat_template=chat_template,
        model_max_length=TINY_DIMS["max_position_embeddings"],
        padding_side="left",
        **kwargs,
    )


def build_tiny_qwen2_tokenizer(chat_template: str | None = QWEN_CHAT_TEMPLATE):
    """A byte-level BPE ``Qwen2Tokenizer`` over a tiny alphabet (ids < 100; no BOS, eos ``<|im_end|>``).

    transformers 5's ``AutoTokenizer`` forces ``Qwen2Tokenizer`` on any folder whose config says ``model_type: qwen2``
    and rebuilds it from tokenizer.json's vocab and merges with Qwen's own pre-tokenizer, so a word-level tokenizer
    saved next to a Qwen2 model comes back encoding everything to nothing. This one survives the round trip:
    ``"w1 w23"`` -> ``w 1 Ġw 2 3``; other text falls back to its characters (characters outside the alphabet vanish).
    """
    from transformers import Qwen2Tokenizer

    symbols = ["Ġ", "Ċ", "w", "Ġw"] + [str(d) for d in range(10)] + sorted(set("systemuserassistant"))
    vocab = {tok: i for i, tok in enumerate(SPECIAL + tuple(symbols))}
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=[("Ġ", "w")],
        unk_token=UNK,
        pad_token=PAD,
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>", "<think>", "</think>"],
        chat_template=chat_template,
        model_max_length=TINY_DIMS["max_position_embeddings"],
        padding_side="left",
    )
    return tok


def build_tiny_tokenizer_for(arch: str):
    """Qwen tokenizers have no BOS (like the real ones); the Llama one has BOS and a template that writes it."""
    if arch == "llama":
        return build_tiny_tokenizer(bos=True, chat_template=LLAMA_CHAT_TEMPLATE)
    if arch == "qwen2":
        return build_tiny_qwen2_tokenizer()
    return build_tiny_tokenizer(bos=False, chat_template=QWEN_CHAT_TEMPLATE)


def build_tiny_hf_model(arch: str, n_layers: int = 3, seed: int = 0):
    """A random-init tiny ``*ForCausalLM`` of ``arch`` in float32 eval mode; same (arch, n_layers, seed) -> same
    weights."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    configs = {"qwen2": Qwen2Config, "qwen3": Qwen3Config, "llama": LlamaConfig}
    if arch not in configs:
        raise ValueError(f"unknown tiny arch {arch!r}: choose one of {TINY_ARCHS}")
    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS)}
    config = configs[arch](
        vocab_size=len(vocab),
        num_hidden_layers=n_layers,
        initializer_range=TINY_INIT_RANGE,
        pad_token_id=vocab[PAD],
        eos_token_id=vocab["<|im_end|>"],
        bos_token_id=vocab[BOS] if arch == "llama" else None,
        **TINY_DIMS,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def save_tiny_model(folder: str | Path, arch: str, n_layers: int = 3, seed: int = 0) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    build_tiny_hf_model(arch, n_layers, seed).save_pretrained(folder)
    build_tiny_tokenizer_for(arch).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory ``(arch="qwen3", n_layers=3, seed=0) -> Path`` of a saved tiny model + tokenizer (cached, read-only)."""
    made: dict[tuple, Path] = {}

    def make(arch: str = "qwen3", n_layers: int = 3, seed: int = 0) -> Path:
        key = (arch, n_layers, seed)
        if key not in made:
            made[key] = save_tiny_model(tmp_path_factory.mktemp(f"tiny-{arch}-{n_layers}l-s{seed}"), *key)
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_loaded_model(tiny_model_dir):
    """Factory ``(arch="qwen3", n_layers=3) -> LoadedModel`` via ``load_model(folder)`` (cached; leave no hooks)."""
    from tellnorm.backends import load_model

    loaded: dict[tuple, object] = {}

    def make(arch: str = "qwen3", n_layers: int = 3):
        key = (arch, n_layers)
        if key not in loaded:
            loaded[key] = load_model(tiny_model_dir(arch, n_layers))
        return loaded[key]

    return make


@pytest.fixture(scope="session")
def hf_reference(tiny_model_dir):
    """Factory ``(arch="qwen3", n_layers=3) -> HF model``: an independent copy of the tiny folder (cached) on the
    kernel the backend runs it with (sdpa)."""
    from transformers import AutoModelForCausalLM

    refs: dict[tuple, object] = {}

    def make(arch: str = "qwen3", n_layers: int = 3):
        key = (arch, n_layers)
        if key not in refs:
            refs[key] = AutoModelForCausalLM.from_pretrained(
                tiny_model_dir(arch, n_layers), attn_implementation="sdpa", local_files_only=True
            ).eval()
        return refs[key]

    return make


@pytest.fixture(scope="session")
def tiny_hf_pair():
    """Factory ``(arch="qwen3", n_layers=3, seed=0) -> (model, tokenizer)``, fresh in memory on every call."""

    def make(arch: str = "qwen3", n_layers: int = 3, seed: int = 0):
        return build_tiny_hf_model(arch, n_layers, seed), build_tiny_tokenizer_for(arch)

    return make
