"""The organism's HF tokenizer: a word-level vocabulary with Qwen3's special tokens and chat template.

One token per word keeps ground-truth labels one-to-one with tokens, while the tokenizer is still a real
``PreTrainedTokenizerFast`` (``AutoTokenizer.from_pretrained`` loads it) whose chat template takes Qwen3's
``enable_thinking`` switch: with ``enable_thinking=False`` the generation prompt ends in an empty think block.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tellnorm.organism.task import MODULUS, REASONING_WORDS, VARIABLES

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<unk>")
WORDS = (
    ("system", "user", "assistant", "\n")
    + tuple(str(d) for d in range(MODULUS))
    + VARIABLES
    + ("=", "+", "-", ";", ".", ",", "?", ":", "what", "is", "answer", "trace", "it")
    + REASONING_WORDS
)

# Qwen3's template, reduced to what the organism needs: role blocks, and an empty think block appended to the
# generation prompt when thinking is switched off (Qwen3 chat template, enable_thinking=False branch).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The organism's word-level tokenizer (one token per word) with Qwen3's special tokens and chat template."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # Spaces separate words and vanish; newlines are tokens of their own (the chat template's structure).
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(" +"), behavior="removed"), pre_tokenizers.Split("\n", behavior="isolated")]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>", "<think>", "</think>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
        padding_side="left",
    )
    return tok


def save_tokenizer(folder: str | Path) -> PreTrainedTokenizerFast:
    """Build the tokenizer, save it to ``folder`` and return it."""
    tok = build_tokenizer()
    tok.save_pretrained(str(folder))
    return tok
