"""Generation and teacher-forced passes on any backend, with per-request state, observable by observers.

The loops themselves live in the backends (:mod:`tellnorm.backends.hf`, :mod:`tellnorm.backends.vllm`); this module
holds what they share: the sampling config and its logit processing, what observers see, and the two entry points.

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
from collections.abc import Callable, Collection, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from tellnorm.errors import TellnormError

if TYPE_CHECKING:
    import torch

# ``model`` parameters below are loaded models (tellnorm.backends.base.ModelAPI), typed Any: the backends import this
# module, so importing their class back, even for type checking only, would be an import cycle (tests/test_layers.py).


@dataclass
class SamplingConfig:
    """How to pick each next token: greedy (``temperature=0``) or sampled, with HF's logit processing."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k filter
    repetition_penalty: float = 1.0
    seed: int = 0
    ignore_eos: bool = False  # vLLM's SamplingParams.ignore_eos: always generate max_new_tokens (benchmarks)

    @classmethod
    def paper(cls, **overrides: Any) -> SamplingConfig:
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
        """Whether tokens are picked by argmax (temperature 0)."""
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
    layer_inputs: dict | None = None  # HF, hybrid models: {state layer: (block input [batch, seq, d_model], its
    #                                   state before this pass or None)} for the layers techniques re-run

    @property
    def new_tokens(self) -> torch.Tensor:
        """Tokens seen for the first time in this run (bool ``[batch, seq]``): what recording observers record."""
        return self.valid if self.fresh is None else self.fresh

    @classmethod
    def default(cls, batch: int, seq: int) -> StepInfo:
        """What a bare forward pass of ``batch`` unpadded rows is: requests 0..batch-1, positions 0..seq-1."""
        import torch

        return cls(list(range(batch)), torch.arange(seq).expand(batch, seq), torch.ones(batch, seq, dtype=torch.bool),
                   "forward", 0)


class Observer(Protocol):
    """What generation and teacher-forced passes call: TransformerLens hooks to install, and each pass's rows."""

    def hooks(self, model: Any) -> list[tuple[str, Any]]:
        """``(hook name, hook function)`` pairs to install on ``model`` for the whole run."""
        ...

    def on_step(self, info: StepInfo) -> None:
        """Called before every forward pass with what its rows are."""
        ...


class FinishedRequests(Protocol):
    """What an observer may add so that a backend can let go of requests as they finish (all three optional).

    ``release`` forgets a finished request's working state (a technique's bank of states, a threshold's tracker);
    what the observer reports (records, counters) stays. Across processes (vLLM's multi-process engine, tensor
    parallelism) the worker's copy also hands its records over: ``take_records`` removes and returns them — at least
    everything about ``request_ids`` (None: everything), more if the observer never reads its records back — and
    the caller's object puts each part back with ``add_records``, in the order they were taken. Worker memory then
    holds the requests in flight, not the whole run."""

    def release(self, request_ids: Collection[Hashable]) -> None:
        """Forget the working state of ``request_ids``, which have finished (no pass will show them again)."""
        ...

    def take_records(self, request_ids: Collection[Hashable] | None) -> Any:
        """Remove and return the records of ``request_ids`` (None: of every request), picklable."""
        ...

    def add_records(self, part: Any) -> None:
        """Put back a part that :meth:`take_records` returned (on another copy of this observer)."""
        ...


def release_finished(observers: Iterable[Any], request_ids: Collection[Hashable]) -> None:
    """Tell every observer that has :meth:`FinishedRequests.release` that ``request_ids`` finished."""
    if request_ids:
        finished = set(request_ids)
        for observer in observers:
            release = getattr(observer, "release", None)
            if release is not None:
                release(finished)


class LayerHooks:
    """Base for observers that hook one point on each of some layers: ``hook_for(layer)`` builds each hook, and
    ``self.info`` is the :class:`StepInfo` of the forward pass running now (None outside generation).

    ``edits_stream``: whether a hook may return a changed stream. Observers that only record say False, so under
    vLLM's tensor parallelism the other ranks need not wait for their outcome."""

    edits_stream = True

    def __init__(self, model: Any, layers: Iterable[int], point: str = "resid_post"):
        self.model = model
        self.layers = list(layers)
        self.point = point
        self.hook_names = [model.hook_name(layer, point) for layer in self.layers]  # validates both
        self.info: StepInfo | None = None

    def hooks(self, model: Any = None) -> list[tuple[str, Any]]:
        """One ``(hook name, hook_for(layer))`` pair per layer."""
        return [(name, self.hook_for(layer)) for layer, name in zip(self.layers, self.hook_names)]

    def on_step(self, info: StepInfo) -> None:
        """Keep the coming pass's :class:`StepInfo` as ``self.info``."""
        self.info = info

    def hook_for(self, layer: int) -> Callable[..., Any]:
        """The TransformerLens hook ``(activation, hook) -> activation | None`` to install at ``layer``."""
        raise NotImplementedError


@dataclass
class Generation:
    """One request's result: prompt and generated token ids, why it stopped, decoded text and per-token extras."""

    request_id: Any
    prompt_ids: list[int]
    generated_ids: list[int]
    finish_reason: str  # "eos" or "length"
    text: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def ids(self) -> list[int]:
        """Prompt followed by generated token ids."""
        return self.prompt_ids + self.generated_ids


def request_seed(seed: int, request_id: Any) -> int:
    """A request's own sampling seed: independent of batch composition and slot."""
    return zlib.crc32(f"{seed}:{request_id}".encode())


def generate(
    model: Any,
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
    for observer in observers:
        getattr(observer, "check_new_requests", lambda _: None)(request_ids)
    gens = model.generate(prompts, sampling, request_ids=request_ids, observers=observers, progress=progress,
                          token_stats=token_stats, reuse_cache=reuse_cache, desc=desc, batch_size=batch_size)
    return _decode_texts(model, gens)


def _decode_texts(model, gens: list[Generation]) -> list[Generation]:
    for g in gens:
        g.text = model.tokenizer.decode(g.generated_ids, skip_special_tokens=False)
    return gens


TOKEN_STATS = ("token_logprob", "topk_mean_logprob", "mean_logprob")
TOKEN_STATS_TOP_K = 20  # DEEPCONF (Fu et al. 2025): confidence from vLLM's top-20 logprobs


def step_token_stats(logits: torch.Tensor, tokens: Sequence[int] | torch.Tensor,
                     ) -> tuple[list[float], list[float], list[float]]:
    """Per row of ``logits`` ``[batch, vocab]`` and picked ``tokens`` ``[batch]``: log p of the picked token, the
    mean of the top-20 log-probabilities, the mean log p over the vocabulary (DeepConf's token confidence is minus the
    second; self-certainty comes from the third)."""
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, torch.as_tensor(tokens, device=logp.device)[:, None])[:, 0]
    top = torch.topk(logp, min(TOKEN_STATS_TOP_K, logp.shape[-1]), dim=-1).values.mean(-1)
    return chosen.tolist(), top.tolist(), logp.mean(-1).tolist()


def run_forward(model: Any, sequences: Sequence[Sequence[int]], *, request_ids: Sequence | None = None,
                batch_size: int = 16, observers: Iterable[Observer] = (), return_logits: bool = False,
                n_prompt: Sequence[int] | None = None) -> dict[Any, torch.Tensor] | None:
    """Teacher-forced forward passes over full sequences (left-padded batches), observed like generation.

    ``n_prompt[i]`` (optional) says how many leading tokens of sequence i are its prompt; observers see it as
    ``StepInfo.n_prompt``, so edits that act on generated tokens act on the same tokens as in generation. Returns
    ``{request_id: [T, vocab] logits}`` when ``return_logits``, else None."""
    request_ids = list(request_ids) if request_ids is not None else list(range(len(sequences)))
    observers = list(observers)
    if n_prompt is not None and len(n_prompt) != len(sequences):
        raise TellnormError(f"n_prompt has {len(n_prompt)} entries for {len(sequences)} sequences: give one each")
    for rid, ids in zip(request_ids, sequences):
        if len(ids) == 0:
            raise TellnormError(f"request {rid!r} is empty")
        if len(ids) > model.max_positions:
            raise TellnormError(f"request {rid!r} has {len(ids)} tokens, over the context of {model.max_positions}")
    return model.run_forward(sequences, request_ids=request_ids, observers=observers, n_prompt=n_prompt,
                             batch_size=batch_size, return_logits=return_logits)


def seen_tokens(histories: Sequence[Sequence[int]], vocab_size: int, device: Any = "cpu") -> torch.Tensor:
    """``[batch, vocab]`` bool: which token ids each row's history (prompt and generated so far) holds — what the
    repetition penalty reads. Generation loops keep it up to date with :func:`mark_seen` instead of rebuilding it."""
    import torch

    seen = torch.zeros((len(histories), vocab_size), dtype=torch.bool, device=device)
    for row, ids in enumerate(histories):
        if len(ids):
            seen[row, torch.as_tensor(list(ids), device=device)] = True
    return seen


def mark_seen(seen: torch.Tensor, tokens: Sequence[int]) -> None:
    """Record each row's new token (``tokens[row]``) in ``seen`` ``[batch, vocab]``, in place."""
    import torch

    rows = torch.arange(len(tokens), device=seen.device)
    seen[rows, torch.as_tensor(list(tokens), device=seen.device)] = True


def process_logits(logits: torch.Tensor, seen: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Next-token logits ``[batch, vocab]`` after repetition penalty (over ``seen`` ``[batch, vocab]``, see
    :func:`seen_tokens`), temperature, top-k and top-p: HF's order and rules, row by row. Every step is elementwise or
    within a row, so a row comes out bit-identical alone or in any batch."""
    import torch

    if sampling.repetition_penalty != 1.0:
        # Seen tokens: positive logits divided, negative multiplied, by the penalty.
        penalised = torch.where(logits > 0, logits / sampling.repetition_penalty,
                                logits * sampling.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if sampling.greedy:
        return logits
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop the low tail whose total mass is at most 1 - top_p; the top token always stays.
        drop_sorted = cumulative <= (1 - sampling.top_p)
        drop_sorted[..., -1] = False
        logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, sorted_idx, drop_sorted),
                                    float("-inf"))
    return logits


def pick_tokens(logits: torch.Tensor, seen: torch.Tensor | None, sampling: SamplingConfig,
                generators: Sequence[torch.Generator | None]) -> list[int]:
    """Each row's next token id from logits ``[batch, vocab]``: argmax when greedy, else a draw with that row's
    request's generator (``generators[row]``). ``seen`` ``[batch, vocab]`` is read only under a repetition penalty
    (None otherwise)."""
    import torch

    if sampling.repetition_penalty != 1.0 and seen is None:
        raise ValueError("a repetition penalty needs each row's seen tokens")
    logits = process_logits(logits, seen, sampling)
    if sampling.greedy:
        return logits.argmax(-1).tolist()
    probs = logits.softmax(-1).cpu()
    return [int(torch.multinomial(probs[row], 1, generator=generator)) for row, generator in enumerate(generators)]
