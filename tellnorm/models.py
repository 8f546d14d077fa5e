"""One model backend for any HF causal LM: a TransformerLens ``TransformerBridge`` over the raw HF module.

``load_model(spec)`` accepts ``"organism"`` (the default everywhere), a local HF folder, an HF hub name (from the
local cache only when offline), or an in-memory ``(model, tokenizer)`` pair. The bridge keeps HF's numerics, so
``blocks.L.hook_resid_post`` is exactly the output of HF decoder layer L (not ``output_hidden_states[L+1]`` for the
last layer, which HF returns after the final norm). Hooks go through TransformerLens's single namespace; because
the bridge wraps HF's own submodules, they fire whether the bridge or the HF model is called, so generation code
can drive HF's KV cache and padding directly and still be observed by TL hooks.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tellnorm.errors import TellnormError
from tellnorm.organism.paths import DEFAULT_ORGANISM_DIR

SUPPORTED_ARCHITECTURES = {
    "Qwen2ForCausalLM": "qwen2",  # Qwen2, Qwen2.5, DeepSeek-R1-Distill-Qwen
    "Qwen3ForCausalLM": "qwen3",
    "LlamaForCausalLM": "llama",  # Llama 3, DeepSeek-R1-Distill-Llama
}
# Hook points selectable for tracing; all are TransformerLens aliases that the bridge resolves.
HOOK_POINTS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
ORGANISM = "organism"


@dataclass
class LoadedModel:
    """A bridge plus what analyses need: tokenizer, chat formatting with the thinking switch, shape."""

    bridge: Any  # transformer_lens.model_bridge.TransformerBridge
    tokenizer: Any
    name: str
    architecture: str
    n_layers: int
    d_model: int
    max_positions: int
    source: str  # "organism", "folder", "hub-cache" or "memory"
    info: dict = field(default_factory=dict)

    @property
    def hf_model(self):
        return self.bridge.original_model

    @property
    def device(self):
        return next(self.hf_model.parameters()).device

    def hook_name(self, layer: int, point: str = "resid_post") -> str:
        if point not in HOOK_POINTS:
            raise TellnormError(f"unknown hook point {point!r}: choose one of {', '.join(HOOK_POINTS)}")
        if not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise TellnormError(f"layer {layer!r} is out of range: {self.name} has layers 0..{self.n_layers - 1}")
        return f"blocks.{layer}.hook_{point}"

    def late_layers(self) -> list[int]:
        """The paper code's default target layers: the last quarter, final layer excluded (PAPER.md §1)."""
        L = self.n_layers
        return list(range(L - L // 4, L - 1)) or [L - 1]

    def chat_prompt(self, user_text: str, thinking: bool = True) -> str:
        """The chat-formatted prompt with the generation prompt; ``thinking`` is Qwen3's ``enable_thinking``."""
        if not user_text or not user_text.strip():
            raise TellnormError("empty prompt: give the model some text to respond to")
        messages = [{"role": "user", "content": user_text}]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, enable_thinking=thinking
            )
        return user_text  # base models without a template see the raw text

    def encode(self, text: str) -> list[int]:
        """Token ids of already-formatted text, adding BOS only when the model expects one and it is absent."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        bos = self.tokenizer.bos_token_id
        if self.info.get("prepend_bos") and bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        if not ids:
            raise TellnormError("empty prompt: it encodes to no tokens")
        if len(ids) > self.max_positions:
            raise TellnormError(
                f"prompt has {len(ids)} tokens but {self.name} has a context of {self.max_positions}: shorten it"
            )
        return ids

    def token_strings(self, ids) -> list[str]:
        return self.tokenizer.convert_ids_to_tokens([int(i) for i in ids])


def load_model(spec: Any = ORGANISM, *, device: str = "cpu", dtype: str = "float32") -> LoadedModel:
    """Load ``spec`` as a :class:`LoadedModel` (see module docstring for what ``spec`` can be)."""
    import torch

    torch_dtype = getattr(torch, dtype)
    if isinstance(spec, LoadedModel):
        return spec
    if isinstance(spec, tuple) and len(spec) == 2:
        model, tokenizer = spec
        return _wrap(model, tokenizer, name=getattr(model.config, "_name_or_path", "") or "in-memory model",
                     source="memory", device=device)
    if not isinstance(spec, (str, Path)):
        raise TellnormError(f"cannot load a model from {type(spec).__name__}: pass 'organism', a folder, "
                            "a hub name or a (model, tokenizer) pair")
    spec = str(spec)
    if spec == ORGANISM:
        return _load_folder(DEFAULT_ORGANISM_DIR, name=ORGANISM, source=ORGANISM, device=device, dtype=torch_dtype)
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise TellnormError(f"{spec} is a file: pass the folder that holds config.json and the weights")
        return _load_folder(path, name=spec, source="folder", device=device, dtype=torch_dtype)
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise TellnormError(f"model {spec!r} is neither an existing folder nor a hub name like 'Qwen/Qwen3-4B'")
    return _load_hub_cache(spec, device=device, dtype=torch_dtype)


def _load_folder(path: Path, *, name: str, source: str, device: str, dtype) -> LoadedModel:
    config_file = path / "config.json"
    rebuild = " Rebuild it with: tellnorm organism train" if source == ORGANISM else ""
    if not config_file.is_file():
        raise TellnormError(f"{path} has no config.json: it is not an HF model folder.{rebuild}")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise TellnormError(f"{config_file} is not valid JSON ({err.msg}).{rebuild}") from None
    _check_architecture(config.get("architectures") or [config.get("model_type", "?")], name)
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise TellnormError(f"{path} has a config but no weights (*.safetensors or *.bin).{rebuild}")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a tiny checkpoint's "Loading weights" bar is noise on stderr
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as err:  # corrupt or truncated files surface as many exception types
        raise TellnormError(f"cannot load {path}: {type(err).__name__}: {str(err).splitlines()[0][:200]}.{rebuild}") from None
    if (path / "organism.json").is_file():
        source = ORGANISM  # a retrained copy of the organism elsewhere is still the organism (labels apply)
    return _wrap(model, tokenizer, name=name, source=source, device=device)


def _load_hub_cache(name: str, *, device: str, dtype) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=offline)
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=offline)
    except Exception:
        raise TellnormError(
            f"the weights of {name!r} are not available offline: download them where there is network "
            f"(hf download {name} --local-dir DIR), copy DIR here and pass it as the model"
        ) from None
    _check_architecture(model.config.architectures or [type(model).__name__], name)
    return _wrap(model, tokenizer, name=name, source="hub-cache", device=device)


def _check_architecture(architectures: list[str], name: str) -> str:
    for arch in architectures:
        if arch in SUPPORTED_ARCHITECTURES:
            return arch
    raise TellnormError(
        f"{name}: architecture {', '.join(map(str, architectures))} is not supported; tellnorm supports "
        f"{', '.join(SUPPORTED_ARCHITECTURES)} (Qwen2/2.5, Qwen3, Llama and the DeepSeek-R1-Distill family)"
    )


def _stable_tokenizer(tokenizer):
    """TL can raise KeyError('name_or_path') on in-memory tokenizers: round-trip through a folder (STACK.md)."""
    from transformers import AutoTokenizer

    if getattr(tokenizer, "name_or_path", None) and Path(str(tokenizer.name_or_path)).is_dir():
        return tokenizer
    # The folder must outlive this call: TL reloads a BOS tokenizer from its name_or_path (add_bos_token=True).
    # It lives as long as the tokenizer that names it, and goes at interpreter exit at the latest.
    tmp = tempfile.mkdtemp(prefix="tellnorm-tokenizer-")
    try:
        tokenizer.save_pretrained(tmp)
        reloaded = AutoTokenizer.from_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    weakref.finalize(reloaded, shutil.rmtree, tmp, ignore_errors=True)
    return reloaded


def _wrap(model, tokenizer, *, name: str, source: str, device: str) -> LoadedModel:
    from transformer_lens.model_bridge import TransformerBridge

    arch = _check_architecture(model.config.architectures or [type(model).__name__], name)
    tokenizer = _stable_tokenizer(tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    model.to(device)
    bridge = TransformerBridge.boot_transformers(name, hf_model=model, tokenizer=tokenizer, device=device)
    cfg = model.config
    # Llama expects BOS and its chat templates write it; Qwen has none (STACK.md). Avoid a double BOS.
    prepend_bos = arch == "LlamaForCausalLM"
    return LoadedModel(
        bridge=bridge,
        tokenizer=tokenizer,
        name=name,
        architecture=SUPPORTED_ARCHITECTURES[arch],
        n_layers=cfg.num_hidden_layers,
        d_model=cfg.hidden_size,
        max_positions=cfg.max_position_embeddings,
        source=source,
        info={"prepend_bos": prepend_bos},
    )
