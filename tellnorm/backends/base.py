"""What every backend shares: the model interface, the architecture table, the BOS rule and named subjects.

* :class:`ModelAPI` — what studies and techniques may ask of a loaded model on any backend.
* :data:`SUPPORTED_ARCHITECTURES` / :data:`REFUSED_ARCHITECTURES` — each HF architecture tellnorm runs (how it treats
  it) or refuses (why), checked on tiny random models by ``tests/test_architectures.py``.
* :func:`wants_bos` — whether encoding prepends BOS (Llama and Gemma do, Qwen does not; never twice).
* :class:`Subject` / :func:`subjects` — models that a package ships by name (``"organism"``). Packages register
  them through the ``tellnorm.subjects`` entry point group, so the core never imports the organism.
* :class:`ExtraBlockPass` — what a technique that re-runs a decoder block (ALRR) needs from a backend that drives the
  blocks itself; backends never import techniques.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tellnorm.errors import TellnormError
from tellnorm.thinking import switch_for

if TYPE_CHECKING:
    import torch

    from tellnorm.generation import Generation, Observer, SamplingConfig

THINK_MARKERS = ("<think>", "</think>")  # the think block's tokens in Qwen3 / DeepSeek-R1-style chat templates
SUBJECTS_GROUP = "tellnorm.subjects"  # entry point group of named subjects (pyproject.toml)
# (token strings of one request, its prompt length) -> (a step label or None per token, {position: matched role})
TokenLabeler = Callable[[Sequence[str], int], tuple[list, dict]]


@dataclass(frozen=True)
class Family:
    """How tellnorm treats one HF architecture (a row of :data:`SUPPORTED_ARCHITECTURES`).

    ``bos``: True/False, or None to follow the tokenizer (BOS when its own encoding adds one).
    ``attn_implementation``: the attention kernel forced for numerics (None: the model's own, ``sdpa`` by default;
    see :mod:`tellnorm.backends.fastpath`).
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
                                "format has no BOS (eager attention: sdpa has no sinks)", attn_implementation="eager"),
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
    "Qwen3_5ForCausalLM": Family("qwen3_5", False, "Qwen3.5 dense (Gated DeltaNet linear attention, every 4th "
                                 "layer gated full attention); the text model of Qwen3_5ForConditionalGeneration"),
    "Qwen3_5MoeForCausalLM": Family("qwen3_5_moe", False, "Qwen3.5 MoE (35B-A3B, 397B-A17B); the text model of "
                                    "Qwen3_5MoeForConditionalGeneration"),
    "Qwen3NextForCausalLM": Family("qwen3_next", False, "Qwen3-Next (80B-A3B; Gated DeltaNet hybrid, MoE)"),
    "OlmoHybridForCausalLM": Family("olmo_hybrid", None, "OLMo Hybrid (Gated DeltaNet hybrid)"),
    "DeepseekV2ForCausalLM": Family("deepseek_v2", True, "DeepSeek-V2 (MLA, MoE); eager attention: the bridge's "
                                    "MLA applies no causal mask under sdpa", attn_implementation="eager",
                                    alrr=_MLA_CACHE),
    "DeepseekV3ForCausalLM": Family("deepseek_v3", True, "DeepSeek-V3/R1 (MLA, MoE); eager attention: the "
                                    "bridge's MLA applies no causal mask under sdpa", attn_implementation="eager",
                                    alrr=_MLA_CACHE),
}
# Multimodal checkpoints whose text model transformers' AutoModelForCausalLM loads (Qwen3.5 ships only these).
TEXT_MODELS = {"Qwen3_5ForConditionalGeneration": "Qwen3_5ForCausalLM",
               "Qwen3_5MoeForConditionalGeneration": "Qwen3_5MoeForCausalLM"}
_STATE_SPACE = ("its {what} layers keep a recurrent state whose cache tellnorm has not checked generation, tracing "
                "and ALRR's extra pass against (of the recurrent hybrids, only the Gated DeltaNet ones are: Qwen3.5, "
                "Qwen3-Next, OLMo Hybrid)")
# Architectures the bridge knows but tellnorm refuses, with the reason (one clause each).
REFUSED_ARCHITECTURES: dict[str, str] = {
    **{arch: _STATE_SPACE.format(what="state-space/recurrent") for arch in (
        "FalconH1ForCausalLM", "BambaForCausalLM", "JambaForCausalLM", "Zamba2ForCausalLM", "NemotronHForCausalLM",
        "GraniteMoeHybridForCausalLM", "RecurrentGemmaForCausalLM", "MambaForCausalLM", "Mamba2ForCausalLM",
        "FalconMambaForCausalLM", "RwkvForCausalLM", "RWKV7ForCausalLM")},
    **{arch: _STATE_SPACE.format(what="short-convolution") for arch in ("Lfm2ForCausalLM", "Lfm2MoeForCausalLM")},
    "Gemma3ForConditionalGeneration": "it is the multimodal Gemma 3 wrapper: load its text model as Gemma3ForCausalLM",
    **{arch: ("TransformerLens's bridge does not reproduce HF's parallel attention+MLP blocks for it (measured on a "
              "tiny model: hook_resid_post and the logits differ from HF's)")
       for arch in ("CohereForCausalLM", "Cohere2ForCausalLM")},
}


# Hook points selectable for tracing; all are TransformerLens aliases that the bridge resolves.
HOOK_POINTS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
# Where the bridge has no alias for a point at some layer (a hybrid's linear-attention layers), the same tensor
# under the bridge's own name: the mixer's output, and the residual entering the second norm.
HOOK_FALLBACKS = {"attn_out": "linear_attn.hook_out", "resid_mid": "ln2.hook_in"}


def hook_aliases(hook_names: set[str], n_layers: int) -> dict[tuple[int, str], str]:
    """``{(layer, point): name}`` for each point a layer lacks the alias of, from :data:`HOOK_FALLBACKS`; a point
    with neither stays unmapped (and fails where it is asked for)."""
    aliases = {}
    for layer in range(n_layers):
        for point, fallback in HOOK_FALLBACKS.items():
            name = f"blocks.{layer}.{fallback}"
            if f"blocks.{layer}.hook_{point}" not in hook_names and name in hook_names:
                aliases[(layer, point)] = name
    return aliases


@dataclass(frozen=True)
class Subject:
    """A model shipped under a name, with its SAEs and what it knows about its own tokens (the organism is one)."""

    name: str
    model_dir: Path
    sae_dir: Path | None = None
    marker: str | None = None  # a file whose presence marks a folder as a copy of this subject
    token_labeler: TokenLabeler | None = None
    rebuild: str = ""  # the command that rebuilds its model folder, for error messages
    sae_rebuild: str = ""  # the command that rebuilds its SAEs


@lru_cache(maxsize=1)
def subjects() -> dict[str, Subject]:
    """Every registered subject by name (entry point group ``tellnorm.subjects``: ``name = "module:SUBJECT"``)."""
    found = {}
    for point in entry_points(group=SUBJECTS_GROUP):
        subject = point.load()
        found[subject.name] = subject
    return found


def subject_of_folder(path: Path) -> Subject | None:
    """The subject whose marker file ``path`` holds (a retrained copy of the organism is still the organism)."""
    return next((s for s in subjects().values() if s.marker and (Path(path) / s.marker).is_file()), None)


class ExtraBlockPass(Protocol):
    """A backend's per-step context for techniques that re-run a decoder block on some rows (ALRR's extra pass).

    Observers that need it declare ``extra_pass_layers`` (the layers whose block inputs the backend must keep)."""

    def extra_block_pass(self, layer: int, hidden: Any, rows: Any, cols: Any) -> Any:
        """Block ``layer`` re-applied to inputs ``hidden`` ``[n, d_model]`` of the step's tokens ``(rows, cols)``
        in their real context; returns ``[n, d_model]`` outputs and leaves every cache as it was."""
        ...


class ModelAPI:
    """What analyses need from a loaded model whatever runs it (:mod:`.hf`, :mod:`.vllm`): shape, hook names, chat
    formatting with the thinking switch, encoding, and the two calls every backend implements.

    ``generate`` and ``run_forward`` are reached through :func:`tellnorm.generation.generate` /
    :func:`tellnorm.generation.run_forward`, which validate the requests first. Observers see a
    :class:`~tellnorm.generation.StepInfo` before every pass; ``StepInfo.backend`` is an :class:`ExtraBlockPass` on
    backends that re-run blocks themselves (vLLM), so techniques ask the interface, not a backend class."""

    backend = "hf"
    n_layers: int
    name: str
    tokenizer: Any
    info: dict
    think_markers: tuple[str, str] = THINK_MARKERS
    token_labeler: TokenLabeler | None = None  # set by the subject that defines step labels (the organism)

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *, request_ids: Sequence,
                 observers: Sequence[Observer] = (), progress: bool = False, token_stats: bool = False,
                 reuse_cache: bool = True, desc: str = "generating", batch_size: int = 16) -> list[Generation]:
        """Generations (``tellnorm.generation.Generation``, text not yet decoded) of validated requests."""
        raise NotImplementedError

    def run_forward(self, sequences: Sequence[Sequence[int]], *, request_ids: Sequence,
                    observers: Sequence[Observer] = (), n_prompt: Sequence[int] | None = None, batch_size: int = 16,
                    return_logits: bool = False) -> dict[Any, torch.Tensor] | None:
        """Teacher-forced passes over validated sequences; ``{request_id: [T, vocab] logits}`` if asked."""
        raise NotImplementedError

    def hook_name(self, layer: int, point: str = "resid_post") -> str:
        """``blocks.{layer}.hook_{point}``, TransformerLens's name for that point (or the bridge's own name for it where
        a layer lacks the alias: a linear-attention layer's ``attn_out``); bad layers or points raise."""
        if point not in HOOK_POINTS:
            raise TellnormError(f"unknown hook point {point!r}: choose one of {', '.join(HOOK_POINTS)}")
        if not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise TellnormError(f"layer {layer!r} is out of range: {self.name} has layers 0..{self.n_layers - 1}")
        return self.info.get("hook_aliases", {}).get((layer, point), f"blocks.{layer}.hook_{point}")

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

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """The tokenizer's string of each id (special tokens included)."""
        return self.tokenizer.convert_ids_to_tokens([int(i) for i in ids])



def check_architecture(architectures: list[str], name: str) -> str:
    """The first of ``architectures`` tellnorm supports (a multimodal checkpoint's text model, :data:`TEXT_MODELS`);
    else one TellnormError line saying why not."""
    for arch in architectures:
        arch = TEXT_MODELS.get(arch, arch)
        if arch in SUPPORTED_ARCHITECTURES:
            return arch
    given = ", ".join(map(str, architectures))
    supported = f"tellnorm supports {', '.join(SUPPORTED_ARCHITECTURES)}"
    for arch in architectures:
        if arch in REFUSED_ARCHITECTURES:
            raise TellnormError(f"{name}: architecture {arch} is not supported because {REFUSED_ARCHITECTURES[arch]}")
    if any(arch in bridge_architectures() for arch in architectures):
        raise TellnormError(
            f"{name}: architecture {given} is not supported: TransformerLens's bridge knows it, but tellnorm has not "
            f"checked its decoder layers against HF (a decoder-only model with model.layers); {supported}"
        )
    raise TellnormError(f"{name}: architecture {given} is not supported: TransformerLens's bridge does not know it, "
                        f"so tellnorm cannot trace it; {supported}")


def bridge_architectures() -> set[str]:
    """The HF architecture names TransformerLens's bridge has an adapter for (imported only to word an error)."""
    try:
        from transformer_lens.factories.architecture_adapter_factory import (
            SUPPORTED_ARCHITECTURES as BRIDGED,
        )
    except Exception:  # an older or broken transformer_lens: say only that tellnorm does not support it
        return set()
    return set(BRIDGED)


def wants_bos(family: Family, tokenizer: Any) -> bool:
    """Whether ``encode`` prepends BOS: the family's rule, or (``bos=None``) what the tokenizer itself does."""
    if family.bos is not None:
        return family.bos
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return with_special[:1] == [bos] and plain[:1] != [bos]


