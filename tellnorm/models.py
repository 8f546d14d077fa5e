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


@dataclass(frozen=True)
class Family:
    """How tellnorm treats one HF architecture (a row of :data:`SUPPORTED_ARCHITECTURES`).

    ``bos``: True/False, or None to follow the tokenizer (BOS when its own encoding adds one).
    ``attn_implementation``: forced on the HF model before the bridge wraps it (None: keep the model's).
    ``alrr``: None when ALRR's extra block pass works, else why it cannot run (one clause)."""

    family: str
    bos: bool | None
    notes: str
    attn_implementation: str | None = None
    alrr: str | None = None


_MLA_CACHE = ("TransformerLens's MLA attention caches expanded per-head keys/values, while HF's MLA layer reads and "
              "writes a compressed latent cache, so the raw HF layer cannot re-run against this cache")
# Every row is checked by tests/test_architectures.py on a tiny random model: blocks.L.hook_resid_post equals HF's
# decoder layer L output (last layer included), logits equal HF's, batched greedy generation equals one request
# alone, and ALRR's extra pass equals a hooked forward of the truncated sequence (or is refused with ``alrr``).
SUPPORTED_ARCHITECTURES: dict[str, Family] = {
    "Qwen2ForCausalLM": Family("qwen2", False, "Qwen2, Qwen2.5, DeepSeek-R1-Distill-Qwen, QwQ"),
    "Qwen3ForCausalLM": Family("qwen3", False, "Qwen3 dense"),
    "Qwen2MoeForCausalLM": Family("qwen2_moe", False, "Qwen1.5/Qwen2 MoE (shared expert)"),
    "Qwen3MoeForCausalLM": Family("qwen3_moe", False, "Qwen3 MoE (30B-A3B, 235B-A22B)"),
    "LlamaForCausalLM": Family("llama", True, "Llama 3, DeepSeek-R1-Distill-Llama; templates write BOS"),
    "MistralForCausalLM": Family("mistral", True, "Mistral (one sliding window on every layer when set)"),
    "Ministral3ForCausalLM": Family("ministral3", True, "Ministral 3"),
    "MixtralForCausalLM": Family("mixtral", True, "Mixtral MoE"),
    "GemmaForCausalLM": Family("gemma", True, "Gemma 1; needs BOS, embeddings scaled by sqrt(d)"),
    "Gemma2ForCausalLM": Family("gemma2", True, "Gemma 2; sliding/global layers, attention and final-logit "
                                "softcapping (eager attention: sdpa drops the softcap)", attn_implementation="eager"),
    "Gemma3ForCausalLM": Family("gemma3", True, "Gemma 3 text-only (1B, or a text_config); local/global RoPE"),
    "GptOssForCausalLM": Family("gpt_oss", False, "gpt-oss; attention sinks, sliding layers, MoE; the harmony "
                                "format has no BOS", attn_implementation="eager"),
    "Phi3ForCausalLM": Family("phi3", None, "Phi-3, Phi-3.5, Phi-4 (BOS as the tokenizer does it)"),
    "Olmo2ForCausalLM": Family("olmo2", None, "OLMo 2 (norms after each sublayer)"),
    "Olmo3ForCausalLM": Family("olmo3", None, "OLMo 3 (sliding layers with their own RoPE)"),
    "OlmoeForCausalLM": Family("olmoe", None, "OLMoE"),
    "FlexOlmoForCausalLM": Family("flex_olmo", None, "FlexOlmo (MoE)"),
    "SmolLM3ForCausalLM": Family("smollm3", None, "SmolLM3 (NoPE every few layers)"),
    "GraniteForCausalLM": Family("granite", None, "IBM Granite 3.x (embedding/residual/logit multipliers)"),
    "GraniteMoeForCausalLM": Family("granite_moe", None, "IBM Granite MoE"),
    "Glm4ForCausalLM": Family("glm4", None, "GLM-4-0414, GLM-Z1 (norms after each sublayer)"),
    "Glm4MoeForCausalLM": Family("glm4_moe", None, "GLM-4.5/4.6 MoE"),
    "Exaone4ForCausalLM": Family("exaone4", None, "EXAONE 4.0 (sliding layers, global NoPE layers)"),
    "SeedOssForCausalLM": Family("seed_oss", None, "Seed-OSS"),
    "Ernie4_5ForCausalLM": Family("ernie4_5", None, "ERNIE 4.5 dense"),
    "ApertusForCausalLM": Family("apertus", None, "Apertus (xIELU MLP)"),
    "ArceeForCausalLM": Family("arcee", None, "Arcee AFM (ReLU² MLP)"),
    "StableLmForCausalLM": Family("stablelm", None, "StableLM 2 (LayerNorm, partial RoPE)"),
    "NemotronForCausalLM": Family("nemotron", None, "Nemotron/Minitron (LayerNorm1P)"),
    "DeepseekV2ForCausalLM": Family("deepseek_v2", True, "DeepSeek-V2 (MLA, MoE); eager attention: the bridge's "
                                    "MLA applies no causal mask under sdpa", attn_implementation="eager",
                                    alrr=_MLA_CACHE),
    "DeepseekV3ForCausalLM": Family("deepseek_v3", True, "DeepSeek-V3/R1 (MLA, MoE); eager attention: the "
                                    "bridge's MLA applies no causal mask under sdpa", attn_implementation="eager",
                                    alrr=_MLA_CACHE),
}
_HYBRID = ("it is a hybrid model whose {what} layers keep a recurrent state instead of a KV cache, which tellnorm's "
           "batched KV-cache generation and ALRR's read-only extra pass cannot drive")
# Architectures the bridge knows but tellnorm refuses, with the reason (one clause each).
REFUSED_ARCHITECTURES: dict[str, str] = {
    **{arch: _HYBRID.format(what="Gated DeltaNet linear-attention") for arch in (
        "Qwen3NextForCausalLM", "Qwen3_5ForCausalLM", "Qwen3_5MoeForCausalLM", "Qwen3_5ForConditionalGeneration",
        "Qwen3_5MoeForConditionalGeneration", "OlmoHybridForCausalLM")},
    **{arch: _HYBRID.format(what="state-space/recurrent") for arch in (
        "FalconH1ForCausalLM", "BambaForCausalLM", "JambaForCausalLM", "Zamba2ForCausalLM", "NemotronHForCausalLM",
        "GraniteMoeHybridForCausalLM", "RecurrentGemmaForCausalLM", "MambaForCausalLM", "Mamba2ForCausalLM",
        "FalconMambaForCausalLM", "RwkvForCausalLM", "RWKV7ForCausalLM")},
    **{arch: _HYBRID.format(what="short-convolution") for arch in ("Lfm2ForCausalLM", "Lfm2MoeForCausalLM")},
    "Gemma3ForConditionalGeneration": "it is the multimodal Gemma 3 wrapper: load its text model as Gemma3ForCausalLM",
    **{arch: ("TransformerLens's bridge does not reproduce HF's parallel attention+MLP blocks for it (measured on a "
              "tiny model: hook_resid_post and the logits differ from HF's)")
       for arch in ("CohereForCausalLM", "Cohere2ForCausalLM")},
}
# Hook points selectable for tracing; all are TransformerLens aliases that the bridge resolves.
HOOK_POINTS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
ORGANISM = "organism"


class ModelAPI:
    """What analyses need from a loaded model whatever runs it (the HF bridge here, vLLM in
    :mod:`tellnorm.backends.vllm`): shape, hook names, chat formatting with the thinking switch, encoding."""

    backend = "hf"
    n_layers: int
    name: str
    tokenizer: Any
    info: dict

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
        """The chat-formatted prompt with the generation prompt, in thinking or non-thinking mode.

        The family's switch comes from the registry (tellnorm.thinking; Qwen3's ``enable_thinking`` for the
        organism); a mode the model cannot give raises one TellnormError line."""
        if not user_text or not user_text.strip():
            raise TellnormError("empty prompt: give the model some text to respond to")
        from tellnorm.thinking import switch_for

        return switch_for(self).render(self.tokenizer, user_text, thinking)

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


@dataclass
class LoadedModel(ModelAPI):
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
    thinking_family: str | None = None  # a tellnorm.thinking registry family; None: detected from name/template

    @property
    def hf_model(self):
        return self.bridge.original_model

    @property
    def device(self):
        return next(self.hf_model.parameters()).device


BACKENDS = ("hf", "vllm")


def load_model(spec: Any = ORGANISM, *, device: str = "cpu", dtype: str = "float32", backend: str = "hf",
               **engine_options) -> ModelAPI:
    """Load ``spec`` as a :class:`LoadedModel` (see module docstring for what ``spec`` can be).

    ``backend="vllm"`` runs it in vLLM instead (:func:`tellnorm.backends.vllm.load_vllm_model`; ``engine_options``
    go there): generation, tracing, edits and techniques take the same calls on either backend."""
    if isinstance(spec, ModelAPI):
        return spec
    if backend not in BACKENDS:
        raise TellnormError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "vllm":
        from tellnorm.backends.vllm import load_vllm_model

        return load_vllm_model(spec, dtype=dtype, **engine_options)
    if engine_options:
        raise TellnormError(f"engine options {sorted(engine_options)} apply to backend='vllm' only")
    import torch

    torch_dtype = getattr(torch, dtype)
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
    given = ", ".join(map(str, architectures))
    supported = f"tellnorm supports {', '.join(SUPPORTED_ARCHITECTURES)}"
    for arch in architectures:
        if arch in REFUSED_ARCHITECTURES:
            raise TellnormError(f"{name}: architecture {arch} is not supported because {REFUSED_ARCHITECTURES[arch]}")
    if any(arch in _bridge_architectures() for arch in architectures):
        raise TellnormError(
            f"{name}: architecture {given} is not supported: TransformerLens's bridge knows it, but tellnorm has not "
            f"checked its decoder layers against HF (a decoder-only model with model.layers); {supported}"
        )
    raise TellnormError(f"{name}: architecture {given} is not supported: TransformerLens's bridge does not know it, "
                        f"so tellnorm cannot trace it; {supported}")


def _bridge_architectures() -> set[str]:
    """The HF architecture names TransformerLens's bridge has an adapter for (imported only to word an error)."""
    try:
        from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES as bridged
    except Exception:  # an older or broken transformer_lens: say only that tellnorm does not support it
        return set()
    return set(bridged)


def _wants_bos(family: Family, tokenizer) -> bool:
    """Whether ``encode`` prepends BOS: the family's rule, or (``bos=None``) what the tokenizer itself does."""
    if family.bos is not None:
        return family.bos
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return with_special[:1] == [bos] and plain[:1] != [bos]


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
    family = SUPPORTED_ARCHITECTURES[arch]
    model.eval()
    model.to(device)
    wanted = family.attn_implementation
    if wanted and getattr(model.config, "_attn_implementation", None) != wanted:
        model.set_attn_implementation(wanted)
    bridge = TransformerBridge.boot_transformers(name, hf_model=model, tokenizer=tokenizer, device=device)
    cfg = model.config
    # Llama and Gemma expect BOS (their chat templates write it); Qwen has none (STACK.md). Avoid a double BOS.
    prepend_bos = _wants_bos(family, tokenizer)
    return LoadedModel(
        bridge=bridge,
        tokenizer=tokenizer,
        name=name,
        architecture=family.family,
        n_layers=cfg.num_hidden_layers,
        d_model=cfg.hidden_size,
        max_positions=cfg.max_position_embeddings,
        source=source,
        info={"prepend_bos": prepend_bos, "hf_architecture": arch, "alrr_refusal": family.alrr},
    )
