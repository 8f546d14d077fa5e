"""Observers, edits and techniques inside vLLM's forward passes, attributed per request.

vLLM runs one flattened batch per step: the scheduled tokens of every running request back to back (prefill
chunks and single decode tokens mixed), in the order of the runner's ``input_batch``; ``query_start_loc`` says
where each request's rows start. A :class:`Session` turns that into what the HF backend's observers already
understand — a :class:`~tellnorm.generation.StepInfo` over a ``[row, token]`` grid (right-padded, ``valid``
marks real tokens) — and runs each observer's ``blocks.L.hook_resid_post`` hook on the stream after decoder
layer L, gathered into that grid:

* Bounded memory: a row is a segment of one request, not always the whole request. A step can hold hundreds of
  one-token decodes and one prefill chunk of thousands of tokens; a ``[requests, longest]`` grid would give every
  hook requests × longest × d_model (255 decodes and an 8k chunk at d_model 4096 in float32: 34 GB). So the grid
  is as wide as the longest request only while that at most doubles the step's tokens; otherwise it is as wide as
  the mean request and a longer request continues on the next rows (:func:`request_grid`: at most 3 × tokens
  cells). Each row names its request; one request's rows are consecutive and in position order. Every observer
  keys its state by (request, position) and walks tokens row-major, so it reads the segments as one row: the
  results are those of one row per request (only a window along a row, as in feature dashboards, stops at a
  segment's end, as it already stops at a prefill chunk's). Kept over calling each hook once per group of similar-length
  requests, which would need every observer that prepares per-step state in ``on_step`` (its tokens, counters)
  to switch that state between groups; here a step is still one StepInfo, one ``on_step`` and one hook call per
  layer.

* The stream: most of vLLM's decoder layers return ``(hidden, residual)`` and leave the add to the next layer's fused
  norm, so the state after layer L is ``hidden + residual`` — HF's decoder-layer output, the same float32 sum; an
  edit's new state goes back as ``(state', 0)``, and the next fused norm adds zero, an exact no-op. Families whose
  layers add it themselves hand on the whole stream; the tapped model class says which
  (:mod:`~tellnorm.backends.vllm.models`).
* Requests are named by the id tellnorm tags them with (``SamplingParams.extra_args``) or, untagged, by vLLM's
  request id; the ``k``-th child of an ``n > 1`` request is ``(id, k)``. Nothing is keyed by batch slot: vLLM
  reuses slots and moves requests between them.
* Tokens a request shows again (vLLM recomputes a preempted request's prefix) are marked not ``fresh``; recording
  observers skip them and edits replay their recorded decisions, as in the HF backend's cache-free reference.

ALRR's extra pass (:meth:`Session.extra_block_pass`) runs the same vLLM layer again, inside the step's forward
context. It must match the HF backend: a token attends to the cached keys/values of its request's earlier tokens
(written by their first pass) and to its own new key/value — and the cache must end as the first pass left it.
vLLM writes the current tokens' K/V into the paged cache at the step's slot mapping before attending, so the
extra pass is run with the normal slot mapping (its own fresh K/V land in the token's slot and are attended to)
and every cache block the step touched is restored afterwards. Tokens not being recursed take their first-pass
input, so they rewrite identical K/V; only the selected tokens' outputs are used.

Token statistics (``generate(..., token_stats=True)``, :data:`~tellnorm.generation.TOKEN_STATS`) come from hooks on
the runner's sampler: its input is the model's raw next-token logits, one row per request of the batch (in
``input_batch`` order), before any penalty, temperature or top-k/top-p — the distribution the HF backend's
``step_token_stats`` reads. The full-distribution statistics are taken before sampling (the sampler edits its
logits in place), the picked token's log-probability after it; the step's ``[requests, vocab]`` log-probabilities
live only between the two hooks. Rows whose sample vLLM discards (a prompt chunk that does not end the prompt) are
skipped, so a request gets exactly one triple per generated token.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from tellnorm.errors import TellnormError
from tellnorm.generation import TOKEN_STATS, TOKEN_STATS_TOP_K, StepInfo, release_finished

if TYPE_CHECKING:
    import torch

    from tellnorm.backends.vllm import VLLMModel
    from tellnorm.generation import Observer

RUNNER_INTERNALS = ("model", "input_batch", "query_start_loc", "requests")  # what the session reads (V1 runner)
TAG = "tellnorm_request"  # SamplingParams.extra_args key carrying tellnorm's request index
_HOOK = re.compile(r"^blocks\.(\d+)\.hook_resid_post$")
_CHILD = re.compile(r"^(\d+)_(.+-[0-9a-f]+)$")  # vLLM names the k-th child of request R "k_R" (parallel_sampling.py)


def request_grid(starts: Sequence[int], positions: torch.Tensor,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(index, valid, grid_positions)`` ``[rows, width]`` for a flattened batch whose request i owns rows
    ``starts[i]:starts[i+1]`` (``starts`` ``[requests + 1]``, ``positions`` ``[tokens]``): index is each cell's row
    in the flat batch (0 on padding). Request i fills ``ceil(length_i / width)`` consecutive grid rows, in order;
    ``width`` is the longest request when ``requests × longest ≤ 2 × tokens`` (one row each), else the mean
    request length rounded up, so the grid has at most 3 × tokens cells (module docstring)."""
    import torch

    starts = torch.as_tensor(starts, dtype=torch.long)
    lengths = starts[1:] - starts[:-1]
    n, total = len(lengths), int(starts[-1])
    longest = int(lengths.max()) if n else 0
    width = max(1, longest if n * longest <= 2 * total else -(-total // n))
    rows = -(-lengths // width)  # a request with no token this step gets no row
    request = torch.repeat_interleave(torch.arange(n), rows)
    segment = torch.arange(len(request)) - torch.repeat_interleave(rows.cumsum(0) - rows, rows)
    first = starts[:-1][request] + segment * width
    offsets = torch.arange(width)[None, :]
    valid = offsets < (lengths[request] - segment * width)[:, None]
    index = torch.where(valid, first[:, None] + offsets, torch.zeros_like(offsets))
    # a gather, so a copy: the runner reuses its positions buffer, and observers keep what they are given
    return index, valid, torch.where(valid, positions.cpu()[index], torch.zeros_like(index))


class StepStart:
    """``callback(model, args, kwargs)`` run at the start of every forward of a tapped ``model`` (its
    ``tellnorm_step_start``, :mod:`~tellnorm.backends.vllm.models`) until :meth:`remove`, like a hook handle."""

    def __init__(self, model: Any, callback: Callable[..., Any]) -> None:
        self.model = model
        model.tellnorm_step_start = callback

    def remove(self) -> None:
        """Stop the callback (idempotent)."""
        self.model.__dict__.pop("tellnorm_step_start", None)


def touched_blocks(slots: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """The blocks ``[k]`` (sorted, unique) of a layer's paged KV ``cache`` that a step's slot ids ``slots``
    ``[tokens]`` write (negative: padding, none). vLLM hands every attention layer a logical
    ``[blocks, kv_heads, block_size, content]`` view of its cache, whatever the physical layout its attention backend
    declares (``KVCacheLayout``: the layout changes the strides, not the axes), so slot s lies in block
    ``s // block_size`` and ``cache[blocks]`` is those blocks in any layout. A cache of another shape (MLA's latent
    cache, a hybrid model's state) is refused in one line."""
    import torch

    if cache.dim() != 4:
        raise TellnormError(f"ALRR's extra pass on vLLM saves and restores paged [blocks, kv_heads, block_size, "
                            f"content] attention caches; this layer's cache has shape {tuple(cache.shape)}")
    slots = slots[slots >= 0]
    return torch.unique(torch.div(slots, cache.shape[2], rounding_mode="floor"))


def tensor_parallel_place() -> tuple[int, int, Any]:
    """``(rank, world size, group)`` of this worker in vLLM's tensor-parallel group (``(0, 1, None)`` without
    one); pipeline parallelism, which splits the layers between processes, is refused in one line."""
    from vllm.distributed import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 0, 1, None
    if parallel_state.get_pp_group().world_size > 1:
        raise TellnormError("pipeline parallel engines are not supported by tellnorm's vLLM session: use "
                            "tensor_parallel_size")
    group = parallel_state.get_tp_group()
    return group.rank_in_group, group.world_size, group


class Session:
    """The observers of one run on ``model`` (a VLLMModel), attached to the engine's tapped model
    (:meth:`attach`/:meth:`detach`).

    ``request_ids[i]`` is the id observers see for the request tagged ``i``; ``n_prompt`` optionally overrides a
    request's prompt length (teacher-forced passes whose whole sequence is the prompt). ``token_stats``, when a
    dict, is filled with ``{request id: {stat: [float per generated token]}}`` (:data:`TOKEN_STATS`)."""

    def __init__(self, model: VLLMModel, observers: Sequence[Observer], request_ids: Sequence | None = None,
                 n_prompt: Mapping[Any, int] | None = None, token_stats: dict | None = None):
        self.observers = list(observers)
        pooled = [getattr(obs, "name", type(obs).__name__) for obs in self.observers
                  if getattr(obs, "pools_requests", lambda: False)()]
        if pooled:
            raise TellnormError(f"{', '.join(pooled)}: pooled-p2 thresholds pool each step's norms over its requests, "
                                "and on vLLM the scheduler decides which requests share a step: use threshold mode "
                                "exact (per request) or fixed/calibrated on the vLLM backend")
        self.token_stats = token_stats
        self.sampling_step = None  # (observed ids, rows, log-probs [rows, vocab], top-k means, means) until sampled
        self.request_ids = request_ids
        self.n_prompt = n_prompt or {}
        self.model = model
        self.layer_hooks: dict[int, list] = {}
        editing: set[int] = set()
        for observer in self.observers:
            for name, fn in observer.hooks(model):
                match = _HOOK.match(name)
                if match is None:
                    raise TellnormError(f"hook {name!r} is not available on the vLLM backend: it observes the stream "
                                        "after each decoder layer (resid_post); use backend='hf' for other points")
                self.layer_hooks.setdefault(int(match.group(1)), []).append(fn)
                if getattr(observer, "edits_stream", True):  # undeclared: assume it may edit (costs, never diverges)
                    editing.add(int(match.group(1)))
        # Layers whose hooks may change the stream: under tensor parallelism the leader's outcome there is shared.
        self.edit_layers = frozenset(editing)
        self.rank, self.world, self.group = 0, 1, None  # tensor parallel rank and size, set on attach
        # Techniques that re-run blocks (ALRR) say which layers they re-run; only those layers keep a copy of the input.
        self.input_layers = sorted({layer for obs in self.observers for layer in getattr(obs, "extra_pass_layers", ())})
        self.handles: list = []
        self.runner = None
        self.seen: dict = {}  # request id -> tokens observed so far
        self.ids: dict = {}  # vLLM's internal request id -> the id observers see
        self.added_as: dict = {}  # the id observers see -> the vLLM request id the caller added (an n > 1 parent's)
        self.step = 0
        # An exception must not leave vLLM's forward: the engine would be stuck mid-step. The hooks keep the first
        # one here and stand down; the caller aborts the run's requests and re-raises it.
        self.error: BaseException | None = None
        self.outcome: tuple | None = None  # the leader's message about the edit layer it just ran (tensor parallel)

    # -- attaching ---------------------------------------------------------------------------------------------
    def attach(self, runner: Any) -> None:
        """Hook the observers into ``runner``'s tapped model (a vLLM GPU/CPU model runner); raises if attached."""
        from tellnorm.backends.vllm.models import TellnormTaps

        missing = [name for name in RUNNER_INTERNALS if not hasattr(runner, name)]
        if missing:
            raise TellnormError(f"vLLM's {type(runner).__module__}.{type(runner).__name__} lacks what tellnorm's "
                                f"session reads ({', '.join(missing)}): it reads the V1 model runner, which "
                                "VLLM_USE_V2_MODEL_RUNNER=0 selects")
        model = runner.model
        if not isinstance(model, TellnormTaps):
            raise TellnormError(f"the engine runs vLLM's {type(model).__name__}, not a tellnorm model: load it with "
                                "tellnorm.backends.load_model(..., backend='vllm')")
        if self.handles:
            raise TellnormError("this session is attached already: one run at a time")
        self.runner, self.engine_model = runner, model
        self.layers = model.tellnorm_layers()
        self.rank, self.world, self.group = tensor_parallel_place()
        # Followers (ranks > 0) run no observer: at the layers that may edit they apply the leader's outcome and
        # join its extra passes (their collectives need every rank), so no rank can decide differently.
        hooked = self.layer_hooks if self.rank == 0 else self.edit_layers
        try:
            self.handles.append(StepStart(model, self._begin_step))
            for layer in self.input_layers:
                self.handles.append(self.layers[layer].register_forward_pre_hook(partial(self._keep_input, layer)))
            for layer in hooked:
                self.handles.append(self.layers[layer].register_forward_hook(partial(self._after_layer, layer)))
            if self.token_stats is not None and self.rank == 0:
                sampler = getattr(runner, "sampler", None)
                if sampler is None:
                    raise TellnormError(f"vLLM's {type(runner).__name__} has no sampler to take token_stats from "
                                        "(tellnorm reads the V1 model runner): use backend='hf' for token_stats")
                self.handles.append(sampler.register_forward_pre_hook(self._before_sampling, with_kwargs=True))
                self.handles.append(sampler.register_forward_hook(self._after_sampling, with_kwargs=True))
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        """Remove every hook and drop the step's tensors; safe to call on a session that is not attached."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.runner = None
        self.block_inputs, self.grid, self.token_request = {}, None, None
        self.sampling_step = None
        for observer in self.observers:  # a StepInfo holds this session (and its tensors): let both go
            if getattr(observer, "info", None) is not None:
                observer.info = None

    def failed(self) -> bool:
        """Whether a hook raised (the session stood down; the caller aborts the run and re-raises :attr:`error`)."""
        return self.error is not None

    # -- finished requests -------------------------------------------------------------------------------------
    def finish(self, requests: Collection[str]) -> list:
        """Let go of finished ``requests`` (the vLLM request ids the caller added; an ``n > 1`` request's children
        go with it): every
        observer releases their working state (:class:`~tellnorm.generation.FinishedRequests`) and this session
        its own. Returns the ids observers knew them by. An observer that raises stops the session as a hook's
        error does."""
        added = set(requests)
        observed = [rid for rid, added_as in self.added_as.items() if added_as in added]
        if not observed or self.rank > 0 or self.error is not None:
            return observed
        try:
            release_finished(self.observers, observed)
        except BaseException as err:
            self.error = err
            return observed
        gone = set(observed)
        for rid in observed:
            self.seen.pop(rid, None)
            self.added_as.pop(rid, None)
        self.ids = {internal: rid for internal, rid in self.ids.items() if rid not in gone}
        return observed

    def take_records(self, observed: Collection[Hashable] | None) -> dict:
        """Remove and return what the leader recorded about ``observed`` (ids observers see; None: everything):
        one part per observer (None for one that keeps its records until the run ends) and the token
        statistics (a worker's session hands them to the caller, :mod:`~.remote`)."""
        parts = []
        for observer in self.observers:
            take = getattr(observer, "take_records", None)
            parts.append(None if take is None else take(observed))
        stats = self.token_stats or {}
        chosen = list(stats) if observed is None else [rid for rid in observed if rid in stats]
        return {"parts": parts, "token_stats": {rid: stats.pop(rid) for rid in chosen}}

    # -- the hooks ---------------------------------------------------------------------------------------------
    def _request_id(self, internal_id: str):
        tag = (self.runner.requests[internal_id].sampling_params.extra_args or {}).get(TAG)
        child = _CHILD.match(internal_id)
        # the caller's vLLM request id: vLLM appends "-<random suffix>" (and prefixes "k_" for a child)
        added_as = (child.group(2) if child else internal_id).rsplit("-", 1)[0]
        if tag is not None:
            base = self.request_ids[tag] if self.request_ids is not None else tag
        else:
            base = added_as
        observed = (base, int(child.group(1))) if child else base
        self.added_as[observed] = added_as
        return observed

    def _guarded(hook: Callable[..., Any]) -> Callable[..., Any]:  # noqa: N805 (a decorator used in the class body)
        def run(self: Session, *args: Any) -> Any:
            if self.error is not None:
                return None
            try:
                return hook(self, *args)
            except BaseException as err:  # KeyboardInterrupt too: the step must finish for the engine to go on
                self.error = err
                return None

        return run

    @_guarded
    def _begin_step(self, module, args, kwargs):
        import torch

        positions = kwargs["positions"] if "positions" in kwargs else args[1]
        if self.rank > 0:  # a follower: its extra passes get their rows from the leader
            self.positions, self.block_inputs = positions, {}
            return
        runner = self.runner
        n = runner.input_batch.num_reqs
        internal = list(runner.input_batch.req_ids[:n])
        starts = runner.query_start_loc.cpu[: n + 1].tolist()
        index, valid, grid_positions = request_grid(starts, positions)
        first, lengths = torch.tensor(starts[:-1], dtype=torch.long), torch.tensor(starts, dtype=torch.long).diff()
        self.token_request = torch.repeat_interleave(torch.arange(n), lengths)  # [tokens]: request of each flat row
        flat_positions = positions[: starts[-1]].long().cpu()
        request = self.token_request[index[:, 0]]  # [grid rows]: every row holds a token at column 0
        for i in internal:  # once per request, not per step
            if i not in self.ids:
                self.ids[i] = self._request_id(i)
        rids = [self.ids[i] for i in internal]
        seen_before = [self.seen.get(rid, 0) for rid in rids]
        seen = torch.tensor(seen_before, dtype=torch.long)
        fresh = valid & (grid_positions >= seen[request][:, None])
        prefill = not any(seen_before) and not flat_positions[first[lengths > 0]].any()
        n_prompt = [self.n_prompt.get(rid, len(runner.requests[i].prompt_token_ids)) for rid, i in zip(rids, internal)]
        ends = torch.zeros(n, dtype=torch.long).scatter_reduce(0, self.token_request, flat_positions + 1, "amax")
        for rid, before, end in zip(rids, seen_before, ends.tolist()):
            self.seen[rid] = max(before, end)
        self.grid = (index, valid)
        self.flat_valid = index[valid]
        self.positions = positions
        self.block_inputs = {}
        rows = request.tolist()
        info = StepInfo([rids[r] for r in rows], grid_positions, valid, "prefill" if prefill else "decode", self.step,
                        [n_prompt[r] for r in rows], fresh=fresh, backend=self)
        self.step += 1
        for observer in self.observers:
            observer.on_step(info)

    @_guarded
    def _keep_input(self, layer, module, args):
        self.block_inputs[layer] = self.engine_model.tellnorm_stream_in(args)

    def _after_layer(self, layer, module, args, output):
        if self.world == 1 or layer not in self.edit_layers:
            return self._run_hooks(layer, output)
        if self.rank == 0:
            result = self._run_hooks(layer, output)
            outcome, self.outcome = (self.outcome, None) if self.error is None else (("stop",), None)
            self.group.broadcast_object(outcome, src=0)  # every rank exchanges once per edit layer and step, always
            return result
        return self._follow(layer, output)

    @_guarded
    def _run_hooks(self, layer, output):
        state = self.engine_model.tellnorm_stream(output)
        index, valid = self.grid
        original = state[index]
        x = original
        for fn in self.layer_hooks[layer]:
            out = fn(x, None)
            if out is not None:
                x = out
        if x is original:
            self.outcome = ("done", None, None)
            return None
        if layer not in self.edit_layers:
            raise TellnormError(f"an observer that declares edits_stream = False changed the stream at layer {layer}: "
                                "under tensor parallelism the other ranks would not see it (declare edits_stream "
                                "= True)")
        new = x[valid].to(state.dtype)
        changed = (new != original[valid]).any(-1)
        self.outcome = ("done", self.flat_valid[changed.cpu()], new[changed].cpu())
        if any(state is part for part in (output if isinstance(output, tuple) else (output,))):
            state = state.clone()  # the layer's own output tensor, not a sum made here
        state[self.flat_valid] = new
        return self.engine_model.tellnorm_with_stream(output, state)

    def _follow(self, layer, output):
        """A follower at an edit layer: join the leader's extra passes, then apply its outcome (or nothing)."""

        while True:
            message = self.group.broadcast_object(None, src=0)
            if message[0] == "pass":
                _, flat, hidden = message
                try:
                    if self.error is None:
                        self._block_pass(layer, flat, hidden.to(self.positions.device))
                except BaseException as err:
                    self.error = err
                continue
            if message[0] == "stop" or self.error is not None:
                return None
            _, flat, values = message
            if flat is None:
                return None
            state = self.engine_model.tellnorm_stream(output).clone()
            state[flat.to(state.device)] = values.to(state.device, state.dtype)
            return self.engine_model.tellnorm_with_stream(output, state)

    @_guarded
    def _before_sampling(self, module, args, kwargs):
        import torch

        logits = kwargs["logits"] if "logits" in kwargs else args[0]
        runner = self.runner
        n = runner.input_batch.num_reqs
        if logits.shape[0] != n:
            raise TellnormError(f"the sampler got {logits.shape[0]} logit rows for {n} requests (speculative "
                                "decoding?): the vLLM backend's token_stats take one row per request")
        # The runner computes a sample for every request, then drops those of prompt chunks that do not end the
        # prompt: they are no generated token.
        rows = [r for r in range(n) if not runner.discard_request_mask.np[r]]
        if not rows:
            return
        internal = runner.input_batch.req_ids
        rids = [self.ids[internal[r]] if internal[r] in self.ids else self._request_id(internal[r]) for r in rows]
        index = torch.as_tensor(rows, device=logits.device)
        logp = torch.log_softmax(logits[index].float(), dim=-1)
        top = torch.topk(logp, min(TOKEN_STATS_TOP_K, logp.shape[-1]), dim=-1).values.mean(-1)
        self.sampling_step = (rids, index, logp, top.tolist(), logp.mean(-1).tolist())

    @_guarded
    def _after_sampling(self, module, args, kwargs, output):
        step, self.sampling_step = self.sampling_step, None
        if step is None:
            return
        rids, index, logp, top, mean = step
        tokens = output.sampled_token_ids[index, 0].long().to(logp.device)
        chosen = logp.gather(-1, tokens[:, None])[:, 0].tolist()
        for rid, values in zip(rids, zip(chosen, top, mean)):
            stats = self.token_stats.setdefault(rid, {name: [] for name in TOKEN_STATS})
            for name, value in zip(TOKEN_STATS, values):
                stats[name].append(value)

    # -- ALRR --------------------------------------------------------------------------------------------------
    def extra_block_pass(self, layer: int, hidden: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                         ) -> torch.Tensor:
        """One extra pass of decoder layer ``layer`` for grid tokens ``(rows, cols)`` with inputs ``hidden``
        ``[n, d_model]``; returns their outputs ``[n, d_model]`` and leaves the KV cache as it was.

        Each selected token attends to the first-pass keys/values of its request's earlier tokens. One call of the
        layer writes every selected token's new key/value before attending, so two tokens of one request (a
        recomputed prefix replaying its kept passes after vLLM preempted the request, a teacher-forced sequence)
        go in separate calls: call r takes the r-th selected token of every request — by request, not grid row,
        as a request can span several rows — and the cache is restored after each."""
        import torch

        index, _ = self.grid
        requests = self.token_request[index[rows.cpu(), cols.cpu()]].tolist()
        rank = torch.zeros(len(rows), dtype=torch.long)
        counts: dict[int, int] = {}
        for i, request in enumerate(requests):
            rank[i] = counts.get(request, 0)
            counts[request] = rank[i].item() + 1
        if len(rows) and int(rank.max()) > 0:
            out = torch.empty_like(hidden)
            for r in range(int(rank.max()) + 1):
                chosen = rank == r
                at = chosen.to(rows.device)
                out[chosen.to(hidden.device)] = self._extra_block_pass_once(layer, hidden[chosen.to(hidden.device)],
                                                                           rows[at], cols[at])
            return out
        return self._extra_block_pass_once(layer, hidden, rows, cols)

    def _extra_block_pass_once(self, layer: int, hidden: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                               ) -> torch.Tensor:
        """:meth:`extra_block_pass` for at most one token per request."""
        index, _ = self.grid
        flat = index[rows.cpu(), cols.cpu()]
        if self.world > 1:  # the followers run the same pass on their shards (its collectives need every rank)
            self.group.broadcast_object(("pass", flat, hidden.cpu()), src=0)
        return self._block_pass(layer, flat, hidden)

    def _block_pass(self, layer: int, flat: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Decoder layer ``layer`` run again with the step's first-pass inputs, except flat rows ``flat`` ``[n]``
        which take ``hidden`` ``[n, d_model]``; returns those rows' outputs and restores every KV block it wrote."""
        from vllm.forward_context import get_forward_context

        flat = flat.to(hidden.device)
        block = self.layers[layer]
        inputs = self.block_inputs[layer].clone()
        inputs[flat] = hidden.to(inputs.dtype)
        attention = self.engine_model.tellnorm_attention(block)
        cache = attention.kv_cache
        blocks = touched_blocks(get_forward_context().slot_mapping[attention.layer_name], cache)
        saved = cache[blocks].clone()
        try:
            return self.engine_model.tellnorm_rerun(block, self.positions, inputs)[flat]
        finally:
            cache[blocks] = saved
