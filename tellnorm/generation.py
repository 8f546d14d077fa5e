"""Batched generation with per-request state, over HF's KV cache, observable through TL hooks.

Design points, each a correctness trap:
- Left padding: prompts of different lengths are left-padded; padded positions are masked out and position ids
  count only real tokens, so a request generates the same tokens (and norms) alone or in a batch.
- Per-request state: sampling generators, stop flags and observer state are keyed by request id, never by batch
  slot; finished requests leave the batch (their KV rows are dropped), so slots are reused safely.
- Observers see a :class:`StepInfo` before every forward pass (which request each row is, each token's position
  within its request, which tokens are padding) and install TransformerLens hooks through ``bridge.hooks`` — a
  context manager, so hooks are removed on every exit path, exceptions included.
"""

from __future__ import annotations

import zlib
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol, Sequence

import numpy as np

from tellnorm.errors import TellnormError


@dataclass
class SamplingConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k filter
    repetition_penalty: float = 1.0
    seed: int = 0
    ignore_eos: bool = False  # vLLM's SamplingParams.ignore_eos: always generate max_new_tokens (benchmarks)

    @classmethod
    def paper(cls, **overrides) -> "SamplingConfig":
        """The paper code's sampling (PAPER.md §7): temperature 0.7, top-p 0.8, top-k 20, repetition penalty 1.05."""
        return cls(**{"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05, **overrides})

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise TellnormError(f"max_new_tokens must be ≥ 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.repetition_penalty <= 0:
            raise TellnormError("invalid sampling config: need temperature ≥ 0, 0 < top_p ≤ 1, top_k ≥ 0, "
                                "repetition_penalty > 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class StepInfo:
    """What the rows of the coming forward pass are. Tensors are ``[batch, seq]``."""

    request_ids: list
    positions: Any  # position of each token within its request (prompt token 0 = position 0)
    valid: Any  # False on left padding
    phase: str  # "prefill" or "decode" ("forward" in teacher-forced passes)
    step: int  # decode step (0 for prefill)
    n_prompt: list | None = None  # prompt length of each row's request (None when unknown): position >= n_prompt
    #                               is a generated token
    cache: Any = None  # the HF KV cache this pass writes (None in cache-free passes)
    attention_mask: Any = None  # [batch, past + seq] 0/1 over every cached and current column (None: all real)
    fresh: Any = None  # [batch, seq] tokens this run sees for the first time (None: every valid token); a
    #                    cache-free reference recomputes old tokens, which observers that record must skip
    backend: Any = None  # the backend's per-step context for techniques that re-run layers (vLLM: the Session)

    @property
    def new_tokens(self):
        """Tokens seen for the first time in this run: what recording observers should record."""
        return self.valid if self.fresh is None else self.fresh

    @classmethod
    def default(cls, batch: int, seq: int) -> "StepInfo":
        """What a bare forward pass of ``batch`` unpadded rows is: requests 0..batch-1, positions 0..seq-1."""
        import torch

        return cls(list(range(batch)), torch.arange(seq).expand(batch, seq), torch.ones(batch, seq, dtype=torch.bool),
                   "forward", 0)


class Observer(Protocol):
    def hooks(self, model) -> list[tuple[str, Any]]: ...

    def on_step(self, info: StepInfo) -> None: ...


class LayerHooks:
    """Base for observers that hook one point on each of some layers: ``hook_for(layer)`` builds each hook, and
    ``self.info`` is the :class:`StepInfo` of the forward pass running now (None outside generation)."""

    def __init__(self, model, layers: Iterable[int], point: str = "resid_post"):
        self.model = model
        self.layers = list(layers)
        self.point = point
        self.hook_names = [model.hook_name(layer, point) for layer in self.layers]  # validates both
        self.info: StepInfo | None = None

    def hooks(self, model=None) -> list[tuple[str, Any]]:
        return [(name, self.hook_for(layer)) for layer, name in zip(self.layers, self.hook_names)]

    def on_step(self, info: StepInfo) -> None:
        self.info = info

    def hook_for(self, layer: int):
        raise NotImplementedError


@dataclass
class Generation:
    request_id: Any
    prompt_ids: list[int]
    generated_ids: list[int]
    finish_reason: str  # "eos" or "length"
    text: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.generated_ids


def request_seed(seed: int, request_id) -> int:
    """A request's own sampling seed: independent of batch composition and slot."""
    return zlib.crc32(f"{seed}:{request_id}".encode())


def eos_ids(model) -> set[int]:
    ids = set()
    gen_eos = getattr(getattr(model.hf_model, "generation_config", None), "eos_token_id", None)
    for value in (model.tokenizer.eos_token_id, gen_eos, model.hf_model.config.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingConfig | None = None,
    *,
    request_ids: Sequence | None = None,
    batch_size: int = 16,
    observers: Iterable[Observer] = (),
    progress: bool = False,
    desc: str = "generating",
    reuse_cache: bool = True,
    token_stats: bool = False,
) -> list[Generation]:
    """Generate a continuation of every prompt (token ids); returns generations in prompt order.

    A request stops at EOS, after ``max_new_tokens``, or when it fills the model's context ("length").

    ``reuse_cache=False`` is the cache-free reference: every step recomputes each request's whole sequence from a
    fresh cache (observers see old tokens again, marked not ``fresh``); generations must match the cached path.
    ``token_stats=True`` stores per generated token, in ``meta``, what confidence baselines score
    (:data:`TOKEN_STATS`, from the model's raw next-token distribution)."""
    sampling = sampling or SamplingConfig()
    request_ids = list(request_ids) if request_ids is not None else list(range(len(prompts)))
    if len(request_ids) != len(prompts) or len(set(request_ids)) != len(request_ids):
        raise TellnormError("request_ids must be unique, one per prompt")
    for rid, ids in zip(request_ids, prompts):
        if len(ids) == 0:
            raise TellnormError(f"request {rid!r} has an empty prompt")
        if len(ids) >= model.max_positions:
            raise TellnormError(f"request {rid!r}: its prompt has {len(ids)} tokens, which leaves no room in the "
                                f"context of {model.max_positions}; shorten the prompt")
    observers = list(observers)
    if model.backend != "hf":  # vLLM schedules its own batches (batch_size does not apply)
        gens = model.generate(prompts, sampling, request_ids=request_ids, observers=observers, progress=progress,
                              token_stats=token_stats, reuse_cache=reuse_cache, desc=desc)
        return _decode_texts(model, gens)
    from tqdm.auto import tqdm

    results: dict = {}
    # Similar lengths share a batch (less padding); results do not depend on the grouping.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, unit="req")
    with ExitStack() as stack:
        stack.enter_context(model.bridge.hooks(fwd_hooks=[h for obs in observers for h in obs.hooks(model)]))
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = [(request_ids[i], list(prompts[i])) for i in chunk]
            for gen in _generate_batch(model, batch, sampling, observers, reuse_cache, token_stats):
                results[gen.request_id] = gen
            bar.update(len(chunk))
    bar.close()
    return _decode_texts(model, [results[rid] for rid in request_ids])


def _decode_texts(model, gens: list[Generation]) -> list[Generation]:
    for g in gens:
        g.text = model.tokenizer.decode(g.generated_ids, skip_special_tokens=False)
    return gens


TOKEN_STATS = ("token_logprob", "topk_mean_logprob", "mean_logprob")
TOKEN_STATS_TOP_K = 20  # DEEPCONF (Fu et al. 2025): confidence from vLLM's top-20 logprobs


def step_token_stats(logits, tokens):
    """Per row: log p of the picked token, the mean of the top-20 log-probabilities, the mean log p over the
    vocabulary (DeepConf's token confidence is minus the second; self-certainty comes from the third)."""
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, torch.as_tensor(tokens, device=logp.device)[:, None])[:, 0]
    top = torch.topk(logp, min(TOKEN_STATS_TOP_K, logp.shape[-1]), dim=-1).values.mean(-1)
    return chosen.tolist(), top.tolist(), logp.mean(-1).tolist()


def _generate_batch(model, batch, sampling: SamplingConfig, observers, reuse_cache: bool = True,
                    token_stats: bool = False) -> list[Generation]:
    import torch
    from transformers import DynamicCache

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
    cache = DynamicCache()
    step = 0
    fresh = None
    with torch.no_grad():
        while live:
            info = StepInfo(list(live), positions, attention[:, -positions.shape[1]:].bool(),
                            "prefill" if step == 0 else "decode", step, [len(prompt_of[rid]) for rid in live],
                            cache=cache, attention_mask=attention, fresh=fresh)
            for obs in observers:
                obs.on_step(info)
            out = model.hf_model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                                 past_key_values=cache, use_cache=True)
            cache = out.past_key_values if reuse_cache else DynamicCache()
            logits = out.logits[:, -1, :].float()
            next_tokens = []
            for row, rid in enumerate(live):
                history = prompt_of[rid] + generated[rid]
                token = _pick(logits[row], history, sampling, generators.get(rid))
                generated[rid].append(token)
                next_tokens.append(token)
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
            if not keep:
                break
            live = [live[r] for r in keep]
            step += 1
            if not reuse_cache:  # the reference: the whole sequence again, from scratch
                input_ids, attention, positions = left_pad(model, [prompt_of[r] + generated[r] for r in live])
                fresh = torch.zeros_like(attention, dtype=torch.bool)
                fresh[:, -1] = True
                continue
            next_tokens = [next_tokens[r] for r in keep]
            if len(keep) < attention.shape[0]:
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                attention = attention[index]
                positions = positions[index]
            input_ids = torch.tensor(next_tokens, device=device).unsqueeze(1)
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
    gens = []
    for rid, _ in batch:
        meta = {name: np.asarray(values, dtype=np.float32) for name, values in stats[rid].items()} if token_stats else {}
        gens.append(Generation(rid, prompt_of[rid], generated[rid], finished[rid], meta=meta))
    return gens


def left_pad(model, sequences):
    """``input_ids, attention_mask, position_ids`` for left-padded sequences; positions count real tokens only."""
    import torch

    device = model.device
    width = max(len(ids) for ids in sequences)
    if min(len(ids) for ids in sequences) < width and model.hf_model.dtype == torch.float64:
        # The bridge's attention takes its softmax in float32, where a float64 mask value is -inf: fully masked
        # padding rows turn NaN and spread into the real tokens of their row.
        raise TellnormError("a float64 model cannot run left-padded batches (the bridge's float32 softmax turns the "
                            "padding mask into NaN): use batch_size=1 or prompts of one length, or float32")
    input_ids = torch.full((len(sequences), width), model.tokenizer.pad_token_id, dtype=torch.long, device=device)
    attention = torch.zeros((len(sequences), width), dtype=torch.long, device=device)
    for row, ids in enumerate(sequences):
        input_ids[row, width - len(ids):] = torch.tensor(list(ids), device=device)
        attention[row, width - len(ids):] = 1
    return input_ids, attention, (attention.cumsum(-1) - 1).clamp(min=0)


def run_forward(model, sequences: Sequence[Sequence[int]], *, request_ids: Sequence | None = None,
                batch_size: int = 16, observers: Iterable[Observer] = (), return_logits: bool = False,
                n_prompt: Sequence[int] | None = None):
    """Teacher-forced forward passes over full sequences (left-padded batches), observed like generation.

    ``n_prompt[i]`` (optional) says how many leading tokens of sequence i are its prompt; observers see it as
    ``StepInfo.n_prompt``, so edits that act on generated tokens act on the same tokens as in generation."""
    import torch

    request_ids = list(request_ids) if request_ids is not None else list(range(len(sequences)))
    observers = list(observers)
    if n_prompt is not None and len(n_prompt) != len(sequences):
        raise TellnormError(f"n_prompt has {len(n_prompt)} entries for {len(sequences)} sequences: give one each")
    for rid, ids in zip(request_ids, sequences):
        if len(ids) == 0:
            raise TellnormError(f"request {rid!r} is empty")
        if len(ids) > model.max_positions:
            raise TellnormError(f"request {rid!r} has {len(ids)} tokens, over the context of {model.max_positions}")
    if model.backend != "hf":
        if return_logits:
            raise TellnormError("return_logits is available on the HF backend only")
        model.run_forward(sequences, request_ids=request_ids, observers=observers, n_prompt=n_prompt)
        return None
    logits = {}
    with model.bridge.hooks(fwd_hooks=[h for obs in observers for h in obs.hooks(model)]), torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            rids = request_ids[start : start + batch_size]
            chunk = [list(s) for s in sequences[start : start + batch_size]]
            input_ids, attention, positions = left_pad(model, chunk)
            prompt_lengths = None if n_prompt is None else list(n_prompt[start : start + batch_size])
            info = StepInfo(rids, positions, attention.bool(), "forward", 0, prompt_lengths)
            for obs in observers:
                obs.on_step(info)
            out = model.hf_model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=False)
            if return_logits:
                for row, (rid, ids) in enumerate(zip(rids, chunk)):
                    logits[rid] = out.logits[row, -len(ids):].float()
    return logits if return_logits else None


def process_logits(logits, history: list[int], sampling: SamplingConfig):
    """Next-token logits after repetition penalty, temperature, top-k and top-p (HF's order and rules)."""
    import torch

    logits = logits.clone()
    if sampling.repetition_penalty != 1.0 and history:
        # Seen tokens: positive logits divided, negative multiplied, by the penalty.
        seen = torch.tensor(sorted(set(history)), device=logits.device)
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / sampling.repetition_penalty, vals * sampling.repetition_penalty)
    if sampling.greedy:
        return logits
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop the low tail whose total mass is at most 1 - top_p; the top token always stays.
        drop_sorted = cumulative <= (1 - sampling.top_p)
        drop_sorted[-1] = False
        logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(0, sorted_idx, drop_sorted), float("-inf"))
    return logits


def _pick(logits, history: list[int], sampling: SamplingConfig, generator) -> int:
    import torch

    logits = process_logits(logits, history, sampling)
    if sampling.greedy:
        return int(logits.argmax())
    return int(torch.multinomial(logits.softmax(-1).cpu(), 1, generator=generator))
