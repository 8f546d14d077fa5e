"""The HF backend: a TransformerLens ``TransformerBridge`` over the raw HF module, driven with HF's own KV cache.

``load_hf_model(spec)`` accepts a registered subject name (``"organism"``), a local HF folder, an HF hub name (from
the local cache only when offline), or an in-memory ``(model, tokenizer)`` pair. The bridge keeps HF's numerics, so
``blocks.L.hook_resid_post`` is exactly the output of HF decoder layer L (not ``output_hidden_states[L+1]`` for the
last layer, which HF returns after the final norm). Hooks go through TransformerLens's single namespace; because
the bridge wraps HF's own submodules, they fire whether the bridge or the HF model is called, so the generation loop
drives HF's KV cache and padding directly and is still observed by TL hooks.

Design points of the loop, each a correctness trap:
- Left padding: prompts of different lengths are left-padded; padded positions are masked out and position ids
  count only real tokens, so a request generates the same tokens (and norms) alone or in a batch.
- Per-request state: sampling generators, stop flags and observer state are keyed by request id, never by batch
  slot; finished requests leave the batch (their KV rows are dropped), so slots are reused safely.
- Hooks go on through ``bridge.hooks`` — a context manager, so they are removed on every exit path.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import weakref
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tellnorm.backends.base import (
    SUPPORTED_ARCHITECTURES,
    TEXT_MODELS,
    ModelAPI,
    Subject,
    check_architecture,
    hook_aliases,
    subject_of_folder,
    wants_bos,
)
from tellnorm.backends.fastpath import GQA_SDPA, use_model_kernel, use_raw_layers
from tellnorm.errors import TellnormError
from tellnorm.generation import (
    TOKEN_STATS,
    Generation,
    SamplingConfig,
    StepInfo,
    mark_seen,
    pick_tokens,
    release_finished,
    request_seed,
    seen_tokens,
    step_token_stats,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch

    from tellnorm.generation import Observer


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
    source: str  # a subject's name ("organism"), "folder", "hub-cache" or "memory"
    info: dict = field(default_factory=dict)
    thinking_family: str | None = None  # a tellnorm.thinking registry family; None: detected from name/template
    token_labeler: Any = None  # the subject's step labeler (organism), else None

    @property
    def vocab_size(self) -> int:
        """Width of the next-token logits (the vocabulary self-certainty's uniform reference spans)."""
        vocab = getattr(self.hf_model.config, "vocab_size", None)
        return int(vocab if vocab is not None else self.hf_model.get_output_embeddings().weight.shape[0])

    @property
    def hf_model(self) -> Any:
        """The HF ``PreTrainedModel`` the bridge wraps."""
        return self.bridge.original_model

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters."""
        return next(self.hf_model.parameters()).device

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *, request_ids: Sequence,
                 observers: Sequence[Observer] = (), progress: bool = False, token_stats: bool = False,
                 reuse_cache: bool = True, desc: str = "generating", batch_size: int = 16) -> list[Generation]:
        """Batched generation over HF's KV cache (see :func:`tellnorm.generation.generate`)."""
        from tqdm.auto import tqdm

        results: dict = {}
        # Similar lengths share a batch (less padding); results do not depend on the grouping.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        bar = tqdm(total=len(prompts), desc=desc, disable=not progress, unit="req")
        keeper = StateLayerInputs.for_observers(self, observers)
        with ExitStack() as stack:
            stack.enter_context(self.bridge.hooks(fwd_hooks=observer_hooks(self, observers, keeper)))
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                batch = [(request_ids[i], list(prompts[i])) for i in chunk]
                for gen in _generate_batch(self, batch, sampling, observers, reuse_cache, token_stats, keeper):
                    results[gen.request_id] = gen
                bar.update(len(chunk))
        bar.close()
        return [results[rid] for rid in request_ids]

    def run_forward(self, sequences: Sequence[Sequence[int]], *, request_ids: Sequence,
                    observers: Sequence[Observer] = (), n_prompt: Sequence[int] | None = None, batch_size: int = 16,
                    return_logits: bool = False) -> dict[Any, torch.Tensor] | None:
        """Teacher-forced passes in left-padded batches (see :func:`tellnorm.generation.run_forward`); returns
        ``{request_id: [T, vocab] float32 logits}`` when ``return_logits``, else None. Logits of every position
        are computed only when returned or an observer declares ``reads_logits``; otherwise the last one only."""
        import torch

        logits = {}
        reads_logits = any(getattr(obs, "reads_logits", False) for obs in observers)
        keeper = StateLayerInputs.for_observers(self, observers)
        with self.bridge.hooks(fwd_hooks=observer_hooks(self, observers, keeper)), torch.no_grad():
            for start in range(0, len(sequences), batch_size):
                rids = request_ids[start : start + batch_size]
                chunk = [list(s) for s in sequences[start : start + batch_size]]
                input_ids, attention, positions = left_pad(self, chunk)
                prompt_lengths = None if n_prompt is None else list(n_prompt[start : start + batch_size])
                info = StepInfo(rids, positions, attention.bool(), "forward", 0, prompt_lengths)
                if keeper is not None:
                    keeper.begin(info)
                for obs in observers:
                    obs.on_step(info)
                # logits nobody reads are skipped: [T, vocab] is 2.5 GB at 4k tokens for Qwen3's vocabulary
                keep = {} if return_logits or reads_logits else {"logits_to_keep": 1}
                out = self.hf_model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                                    use_cache=False, **keep)
                if return_logits:
                    for row, (rid, ids) in enumerate(zip(rids, chunk)):
                        logits[rid] = out.logits[row, -len(ids):].float()
        return logits if return_logits else None


def load_hf_model(spec: Any, *, device: str = "cpu", dtype: str = "float32", subject: Subject | None = None,
                  attn_implementation: str | None = None) -> LoadedModel:
    """``spec`` (a folder, a cached hub name or a ``(model, tokenizer)`` pair) under the bridge; ``subject``: the
    registered subject it names (then its folder is loaded).

    ``attn_implementation``: HF's attention kernel (``"sdpa"``, ``"flash_attention_2"``, ``"eager"``, ...); None keeps
    the one HF picks when loading (``sdpa`` where torch has it). Architectures that need eager attention get it
    whatever is asked (:data:`~tellnorm.backends.base.SUPPORTED_ARCHITECTURES`)."""
    import torch

    torch_dtype = getattr(torch, dtype)
    if isinstance(spec, tuple) and len(spec) == 2:
        model, tokenizer = spec
        return _wrap(model, tokenizer, name=getattr(model.config, "_name_or_path", "") or "in-memory model",
                     source="memory", device=device, attn_implementation=attn_implementation)
    if not isinstance(spec, (str, Path)):
        raise TellnormError(f"cannot load a model from {type(spec).__name__}: pass 'organism', a folder, "
                            "a hub name or a (model, tokenizer) pair")
    spec = str(spec)
    if subject is not None:
        return _load_folder(subject.model_dir, name=subject.name, source=subject.name, device=device,
                            dtype=torch_dtype, rebuild=subject.rebuild, attn_implementation=attn_implementation)
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise TellnormError(f"{spec} is a file: pass the folder that holds config.json and the weights")
        return _load_folder(path, name=spec, source="folder", device=device, dtype=torch_dtype,
                            attn_implementation=attn_implementation)
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise TellnormError(f"model {spec!r} is neither an existing folder nor a hub name like 'Qwen/Qwen3-4B'")
    return _load_hub_cache(spec, device=device, dtype=torch_dtype, attn_implementation=attn_implementation)


def _load_folder(path: Path, *, name: str, source: str, device: str, dtype, rebuild: str = "",
                 attn_implementation: str | None = None) -> LoadedModel:
    config_file = path / "config.json"
    rebuild = f" Rebuild it with: {rebuild}" if rebuild else ""
    if not config_file.is_file():
        raise TellnormError(f"{path} has no config.json: it is not an HF model folder.{rebuild}")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise TellnormError(f"{config_file} is not valid JSON ({err.msg}).{rebuild}") from None
    check_architecture(config.get("architectures") or [config.get("model_type", "?")], name)
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise TellnormError(f"{path} has a config but no weights (*.safetensors or *.bin).{rebuild}")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a tiny checkpoint's "Loading weights" bar is noise on stderr
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True,
                                                     **_kernel_option(attn_implementation))
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as err:  # corrupt or truncated files surface as many exception types
        first_line = str(err).splitlines()[0][:200]
        raise TellnormError(f"cannot load {path}: {type(err).__name__}: {first_line}.{rebuild}") from None
    subject = subject_of_folder(path)  # a retrained copy of the organism elsewhere is still the organism
    return _wrap(model, tokenizer, name=name, source=subject.name if subject else source, device=device,
                 labeler=subject.token_labeler if subject else None, attn_implementation=attn_implementation)


def _kernel_option(attn_implementation: str | None) -> dict:
    return {} if attn_implementation is None else {"attn_implementation": attn_implementation}


def _load_hub_cache(name: str, *, device: str, dtype, attn_implementation: str | None = None) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=offline,
                                                     **_kernel_option(attn_implementation))
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=offline)
    except Exception:
        raise TellnormError(
            f"the weights of {name!r} are not available offline: download them where there is network "
            f"(hf download {name} --local-dir DIR), copy DIR here and pass it as the model"
        ) from None
    check_architecture(model.config.architectures or [type(model).__name__], name)
    return _wrap(model, tokenizer, name=name, source="hub-cache", device=device,
                 attn_implementation=attn_implementation)


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


def _wrap(model, tokenizer, *, name: str, source: str, device: str, labeler=None,
          attn_implementation: str | None = None) -> LoadedModel:
    from transformer_lens.model_bridge import TransformerBridge

    if type(model).__name__ in TEXT_MODELS:
        raise TellnormError(f"{name} is a {type(model).__name__}: load its text model with "
                            "transformers.AutoModelForCausalLM (or pass its folder)")
    arch = check_architecture([type(model).__name__, *(model.config.architectures or [])], name)
    tokenizer = _stable_tokenizer(tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    family = SUPPORTED_ARCHITECTURES[arch]
    model.eval()
    model.to(device)
    kernel = family.attn_implementation or attn_implementation or model.config._attn_implementation or "sdpa"
    kernel = "sdpa" if kernel == GQA_SDPA else kernel  # a model tellnorm loaded before
    if getattr(model.config, "_attn_implementation", None) != kernel:
        try:
            model.set_attn_implementation(kernel)
        except (ValueError, ImportError) as err:
            first_line = str(err).splitlines()[0][:200]
            raise TellnormError(f"attention kernel {kernel!r} is not available for {name}: {first_line}") from None
    bridge = TransformerBridge.boot_transformers(name, hf_model=model, tokenizer=tokenizer, device=device)
    use_model_kernel(bridge, model, kernel)  # the bridge boots eager; the model's own kernel comes back
    raw_layers = use_raw_layers(model) if family.alrr is None else 0  # MLA layers cannot run on the bridge's cache
    cfg = model.config
    # Llama and Gemma expect BOS (their chat templates write it); Qwen has none (STACK.md). Avoid a double BOS.
    prepend_bos = wants_bos(family, tokenizer)
    return LoadedModel(
        bridge=bridge,
        tokenizer=tokenizer,
        name=name,
        architecture=family.family,
        n_layers=cfg.num_hidden_layers,
        d_model=cfg.hidden_size,
        max_positions=cfg.max_position_embeddings,
        source=source,
        info={"prepend_bos": prepend_bos, "hf_architecture": arch, "alrr_refusal": family.alrr,
              "attention": kernel, "raw_layers": raw_layers,
              "hook_aliases": hook_aliases(set(bridge.hook_dict), cfg.num_hidden_layers)},
        token_labeler=labeler,
    )


def eos_ids(model: LoadedModel) -> set[int]:
    """Token ids that end a request: the tokenizer's EOS, the generation config's and the model config's."""
    ids = set()
    gen_eos = getattr(getattr(model.hf_model, "generation_config", None), "eos_token_id", None)
    for value in (model.tokenizer.eos_token_id, gen_eos, model.hf_model.config.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids


def _generate_batch(model, batch, sampling: SamplingConfig, observers, reuse_cache: bool = True,
                    token_stats: bool = False, keeper: StateLayerInputs | None = None) -> list[Generation]:
    import torch

    device = model.device
    stop_ids = set() if sampling.ignore_eos else eos_ids(model)
    input_ids, attention, positions = left_pad(model, [ids for _, ids in batch])

    live = [rid for rid, _ in batch]  # request id of each row, in row order
    prompt_of = {rid: ids for rid, ids in batch}
    generated: dict = {rid: [] for rid in live}
    stats: dict = {rid: {name: [] for name in TOKEN_STATS} for rid in live}
    generators = {}
    if not sampling.greedy:
        for rid in live:
            generators[rid] = torch.Generator(device="cpu").manual_seed(request_seed(sampling.seed, rid))
    finished: dict = {}
    cache = new_cache(model.hf_model)
    seen = None  # [live rows, vocab]: what the repetition penalty reads
    step = 0
    fresh = None
    with torch.no_grad():
        while live:
            info = StepInfo(list(live), positions, attention[:, -positions.shape[1]:].bool(),
                            "prefill" if step == 0 else "decode", step, [len(prompt_of[rid]) for rid in live],
                            cache=cache, attention_mask=attention, fresh=fresh)
            if keeper is not None:
                keeper.begin(info)
            for obs in observers:
                obs.on_step(info)
            logits, cache = forward_step(model.hf_model, input_ids, attention, positions, cache)
            if not reuse_cache:
                cache = new_cache(model.hf_model)
            if seen is None and sampling.repetition_penalty != 1.0:
                seen = seen_tokens([prompt_of[rid] for rid in live], logits.shape[-1], logits.device)
            next_tokens = pick_tokens(logits, seen, sampling, [generators.get(rid) for rid in live])
            for rid, token in zip(live, next_tokens):
                generated[rid].append(token)
            if seen is not None:
                mark_seen(seen, next_tokens)
            if token_stats:
                for rid, *values in zip(live, *step_token_stats(logits, next_tokens)):
                    for name, value in zip(TOKEN_STATS, values):
                        stats[rid][name].append(value)
            keep = []
            for row, rid in enumerate(live):
                if next_tokens[row] in stop_ids:
                    finished[rid] = "eos"
                elif len(generated[rid]) >= min(sampling.max_new_tokens, model.max_positions - len(prompt_of[rid])):
                    finished[rid] = "length"
                else:
                    keep.append(row)
            release_finished(observers, [rid for rid in live if rid in finished])
            if not keep:
                break
            live = [live[r] for r in keep]
            if seen is not None:
                seen = seen[keep]
            step += 1
            if not reuse_cache:  # the reference: the whole sequence again, from scratch
                input_ids, attention, positions = left_pad(model, [prompt_of[r] + generated[r] for r in live])
                fresh = torch.zeros_like(attention, dtype=torch.bool)
                fresh[:, -1] = True
                continue
            next_tokens = [next_tokens[r] for r in keep]
            if len(keep) < attention.shape[0]:
                index = torch.tensor(keep, device=device)
                select_rows(cache, index)
                attention = attention[index]
                positions = positions[index]
            input_ids = torch.tensor(next_tokens, device=device).unsqueeze(1)
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
    gens = []
    for rid, _ in batch:
        meta = ({name: np.asarray(values, dtype=np.float32) for name, values in stats[rid].items()}
                if token_stats else {})
        gens.append(Generation(rid, prompt_of[rid], generated[rid], finished[rid], meta=meta))
    return gens


def forward_step(hf_model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 cache: Any) -> tuple[torch.Tensor, Any]:
    """One step of cached generation (a prefill or a decode): ``(float32 logits [batch, vocab] at each row's last
    position, the cache)``. HF computes the logits of the last position only, so a prefill of T tokens never holds
    ``[T, vocab]`` logits (0.6 MB per token at Qwen3's vocabulary in float32)."""
    out = hf_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1, :].float(), out.past_key_values


STATE_LAYER_TYPES = ("linear_attention", "conv")  # config.layer_types whose cache layer keeps a running state


def state_layers(config: Any) -> list[int]:
    """The decoder layers that keep a recurrent/convolution state instead of keys and values (a hybrid model's
    linear-attention layers: Qwen3.5, Qwen3-Next, OLMo-Hybrid); empty for a transformer."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return [i for i, kind in enumerate(getattr(text, "layer_types", None) or []) if kind in STATE_LAYER_TYPES]


def new_cache(hf_model: Any) -> Any:
    """An empty cache of the kind the model expects: transformers' ``DynamicCache`` built from the config for a
    hybrid model (state layers where the config says), a plain one otherwise (a sliding-window cache would drop the
    early keys that ALRR's extra pass and the no-cache reference compare against)."""
    from transformers import DynamicCache

    return DynamicCache(config=hf_model.config) if state_layers(hf_model.config) else DynamicCache()


def select_rows(cache: Any, index: torch.Tensor) -> None:
    """Keep only the batch rows ``index`` (long ``[rows]``) of every cache layer, in place: keys and values, and a
    state layer's convolution/recurrent states (transformers selects those only through ``reorder_cache``)."""
    from transformers.cache_utils import LinearAttentionCacheLayerMixin

    for layer in cache.layers:
        if isinstance(layer, LinearAttentionCacheLayerMixin):
            LinearAttentionCacheLayerMixin.reorder_cache(layer, index)
        if hasattr(layer, "keys"):
            layer.batch_select_indices(index)


def copy_state(layer: Any, rows: torch.Tensor | None = None) -> Any:
    """A detached copy of a state cache layer (rows ``rows`` of its batch, all if None) that a block can read and
    update without touching the original; None when the layer holds no state yet (nothing came before)."""
    import copy

    if not any(layer.has_previous_state.values()):
        return None
    pick = (lambda t: t.clone()) if rows is None else (lambda t: t[rows].clone())
    twin = copy.copy(layer)
    twin.conv_states = {i: None if t is None else pick(t) for i, t in layer.conv_states.items()}
    twin.recurrent_states = {i: None if t is None else pick(t) for i, t in layer.recurrent_states.items()}
    for name in ("is_conv_states_initialized", "is_recurrent_states_initialized", "has_previous_state",
                 "conv_kernel_size"):
        setattr(twin, name, dict(getattr(layer, name)))
    return twin


def state_cache(hf_model: Any, layer: int, state: Any = None) -> Any:
    """A cache for one call of state layer ``layer``'s block alone: ``state`` (see :func:`copy_state`; a fresh state
    when None) at ``layer`` and no layer after it, since a block that asks whether the cache holds a state without
    naming its layer is answered from the last state layer (OLMo Hybrid)."""
    cache = new_cache(hf_model)
    cache.layers = cache.layers[: layer + 1]
    if state is not None:
        cache.layers[layer] = state
    return cache


class StateLayerInputs:
    """Keeps, for the state layers that techniques re-run (observers' ``extra_pass_layers``), each pass's block
    inputs ``[batch, seq, d_model]`` and a copy of the layer's state from before the pass, in
    ``StepInfo.layer_inputs``: a linear-attention layer's state has already moved past the pass's tokens when its
    output is hooked, and an extra pass must read the state its token's predecessors left."""

    def __init__(self, model: LoadedModel, layers: Sequence[int]):
        self.model, self.layers = model, list(layers)
        self.info: StepInfo | None = None

    @classmethod
    def for_observers(cls, model: LoadedModel, observers: Sequence[Observer]) -> StateLayerInputs | None:
        """A keeper for the state layers any observer re-runs; None when there is none (every transformer)."""
        wanted = {layer for obs in observers for layer in getattr(obs, "extra_pass_layers", ())}
        layers = sorted(wanted & set(state_layers(model.hf_model.config)))
        return cls(model, layers) if layers else None

    def begin(self, info: StepInfo) -> None:
        """Start keeping the inputs of the pass ``info`` describes."""
        info.layer_inputs = {}
        self.info = info

    def hooks(self) -> list[tuple[str, Any]]:
        """A ``resid_pre`` hook per kept layer (installed after observers' own, so it sees their edits)."""
        def keep(layer: int):
            def hook(x, hook):
                cache = self.info.cache
                state = copy_state(cache.layers[layer]) if cache is not None and len(cache.layers) > layer else None
                self.info.layer_inputs[layer] = (x.detach(), state)
            return hook

        return [(self.model.hook_name(layer, "resid_pre"), keep(layer)) for layer in self.layers]


def observer_hooks(model: LoadedModel, observers: Sequence[Observer], keeper: StateLayerInputs | None,
                   ) -> list[tuple[str, Any]]:
    """Every observer's hooks, then the keeper's (so it keeps a block's input after any edit of it)."""
    hooks = [h for obs in observers for h in obs.hooks(model)]
    return hooks + (keeper.hooks() if keeper is not None else [])


def left_pad(model: LoadedModel, sequences: Sequence[Sequence[int]],
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``input_ids, attention_mask, position_ids``, each ``[batch, max_len]`` on the model's device, for
    left-padded sequences; positions count real tokens only."""
    import torch

    device = model.device
    width = max(len(ids) for ids in sequences)
    if (min(len(ids) for ids in sequences) < width and model.hf_model.dtype == torch.float64
            and model.info.get("attention") == "eager"):
        # Eager attention (HF's and the bridge's) takes its softmax in float32, where a float64 mask value is -inf:
        # fully masked padding rows turn NaN and spread into the real tokens of their row (sdpa masks exactly).
        raise TellnormError("a float64 model cannot run left-padded batches under eager attention (its float32 "
                            "softmax turns the padding mask into NaN): use batch_size=1, prompts of one length, sdpa "
                            "attention or float32")
    input_ids = torch.full((len(sequences), width), model.tokenizer.pad_token_id, dtype=torch.long, device=device)
    attention = torch.zeros((len(sequences), width), dtype=torch.long, device=device)
    for row, ids in enumerate(sequences):
        input_ids[row, width - len(ids):] = torch.tensor(list(ids), device=device)
        attention[row, width - len(ids):] = 1
    return input_ids, attention, (attention.cumsum(-1) - 1).clamp(min=0)


