"""The vLLM session's hooks must cost O(tokens × d_model) per step, whatever mix of decodes and prefill chunks
vLLM schedules, and still give every observer exactly what one row per request would.

The synthetic tests drive the session's hook path with stand-ins for vLLM's runner (no engine): the memory test is
the issue's case, 255 one-token decodes and one long prefill chunk in one step, where a ``[requests, longest]``
grid would be 256 × 2048 × d_model. The engine test runs the organism on vLLM with one long teacher-forced
sequence among short ones, so that sequence spans several grid rows, and checks ALRR's decisions and every norm
against the HF backend's cached generation of it.
"""

from __future__ import annotations

import os
import weakref
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

D_MODEL = 64
DECODES, CHUNK = 255, 2048  # the step: 255 decodes plus one long prefill chunk
LONG_AT = 100  # the chunk's place in the batch (vLLM orders requests by slot, not by kind)


class PeakBytes(TorchDispatchMode):
    """The peak bytes held by tensors that torch ops create inside the mode (views and in-place results share an
    input's storage and are not new memory). torch's CPU allocator keeps no peak statistic, and tracemalloc does
    not see torch's allocations."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = self.largest = 0

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor) or tensor.untyped_storage().data_ptr() in inputs:
                continue
            nbytes = tensor.untyped_storage().nbytes()
            inputs.add(tensor.untyped_storage().data_ptr())
            self.live += nbytes
            self.peak, self.largest = max(self.peak, self.live), max(self.largest, nbytes)
            weakref.finalize(tensor, self._free, nbytes)
        return out


def fake_model():
    """What LayerHooks observers ask of a model: hook names."""
    return SimpleNamespace(hook_name=lambda layer, point="resid_post": f"blocks.{layer}.hook_{point}", n_layers=2)


def session_on(observers, lengths, first_positions, prompt_lengths):
    """A Session attached to a stand-in of vLLM's V1 runner whose step holds request i's ``lengths[i]`` tokens from
    position ``first_positions[i]``; returns the session and the step's positions ``[tokens]``."""
    from tellnorm.backends.vllm.models import TellnormTaps
    from tellnorm.backends.vllm.session import TAG, Session

    internal = [f"tellnorm-1-{i}-{i:04x}" for i in range(len(lengths))]
    requests = {rid: SimpleNamespace(sampling_params=SimpleNamespace(extra_args={TAG: i}),
                                     prompt_token_ids=[0] * prompt_lengths[i]) for i, rid in enumerate(internal)}
    starts = np.concatenate([[0], np.cumsum(lengths)])
    session = Session(fake_model(), observers)
    session.runner = SimpleNamespace(input_batch=SimpleNamespace(num_reqs=len(lengths), req_ids=internal),
                                     query_start_loc=SimpleNamespace(cpu=torch.tensor(starts, dtype=torch.int32)),
                                     requests=requests)
    session.engine_model = TellnormTaps()  # the stream rule of (hidden, residual) layers, as Qwen3's
    positions = torch.cat([torch.arange(p, p + n) for p, n in zip(first_positions, lengths)])
    return session, positions


def mixed_step():
    """The issue's step: ``(lengths, first positions, prompt lengths)`` of 255 decodes and one 2048-token chunk (the
    middle of an 8k prompt)."""
    lengths = [1] * (DECODES + 1)
    lengths[LONG_AT] = CHUNK
    first = [40 + i for i in range(DECODES + 1)]
    first[LONG_AT] = 4096
    prompts = [30] * (DECODES + 1)
    prompts[LONG_AT] = 8192
    return lengths, first, prompts


def run_step(session, positions, layers, generator):
    """One step through the session's hooks: ``_begin_step``, then each layer's output ``(hidden, residual)``
    ``[tokens, d_model]`` each; returns ``{layer: (state before, what the hook handed back)}``."""
    out = {}
    for layer in layers:
        hidden = torch.randn(len(positions), D_MODEL, generator=generator)
        residual = torch.randn(len(positions), D_MODEL, generator=generator)
        out[layer] = (hidden, residual)
    with PeakBytes() as peak:
        session._begin_step(None, (), {"positions": positions})
        results = {layer: session._after_layer(layer, None, (), state) for layer, state in out.items()}
    assert session.error is None, repr(session.error)
    return {layer: (hidden + residual, results[layer]) for layer, (hidden, residual) in out.items()}, peak


@pytest.mark.parametrize("lengths", [[1, 1, 1], [4, 1, 2], [3], [1, 1, 100], [50, 1, 1, 3], [7, 7, 7, 7],
                                     [1, 30, 1, 1, 1, 1, 2, 1], mixed_step()[0]])
def test_the_grid_holds_every_flat_token_once_in_consecutive_rows_and_at_most_three_times_the_tokens(lengths):
    from tellnorm.backends.vllm.session import request_grid

    starts = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    positions = torch.arange(1000, 1000 + starts[-1] + 2)  # two padding rows past the real tokens
    index, valid, grid_positions = request_grid(starts, positions)
    assert index[valid].tolist() == list(range(starts[-1]))  # row-major order is the flat order
    assert grid_positions[valid].tolist() == list(range(1000, 1000 + starts[-1]))
    assert valid[:, 0].all() and (index[~valid] == 0).all() and (grid_positions[~valid] == 0).all()
    token_request = np.repeat(np.arange(len(lengths)), lengths)
    request = token_request[index[:, 0].numpy()]
    assert (np.diff(request) >= 0).all() and (token_request[index.numpy()][valid.numpy()] ==
                                              np.repeat(request, valid.sum(1).numpy())).all()
    assert index.numel() <= 3 * starts[-1]
    if len(lengths) * max(lengths) <= 2 * starts[-1]:  # padding at most doubles the tokens: one row per request
        assert valid.sum(1).tolist() == lengths


def test_a_step_of_255_decodes_and_a_long_prefill_chunk_costs_the_hooks_o_tokens_times_d_model():
    """The issue's step with a norm tracer on two layers and an edit of every token on one: what the hook path
    allocates peaks at a few copies of the step's ``[tokens, d_model]`` stream, where one padded grid alone would
    be ``[requests, longest, d_model]`` (≈ 227 × more here)."""
    from tellnorm.interventions.edits import Scale
    from tellnorm.norms import NormTracer

    lengths, first, prompts = mixed_step()
    tokens = sum(lengths)
    session, positions = session_on([NormTracer(fake_model(), [0, 1]), Scale(fake_model(), [1], 2.0)], lengths,
                                    first, prompts)
    _, peak = run_step(session, positions, [0, 1], torch.Generator().manual_seed(0))
    stream = tokens * D_MODEL * 4  # one float32 [tokens, d_model]
    padded = len(lengths) * CHUNK * D_MODEL * 4  # one float32 [requests, longest, d_model]
    assert peak.peak <= 12 * stream, (f"the hook path peaked at {peak.peak / stream:.1f} × [tokens, d_model] "
                                      f"({peak.peak / 2**20:.1f} MiB; a padded grid is {padded / 2**20:.0f} MiB)")
    assert peak.largest <= 3 * stream


def test_hooks_on_segmented_rows_see_and_write_exactly_what_one_row_per_request_would():
    """Per (request, position): the norm traced, the StepInfo's prompt length and freshness, the edit's decisions
    and the state written back, against the flat batch itself."""
    from tellnorm.interventions.edits import Scale
    from tellnorm.norms import NormTracer, l2_norm

    lengths, first, prompts = [1, 40, 1, 1, 2, 1], [9, 0, 12, 30, 5, 7], [5, 40, 8, 20, 6, 6]
    tracer, scale = NormTracer(fake_model(), [0, 1]), Scale(fake_model(), [1], 2.0)
    infos = []
    spy = SimpleNamespace(hooks=lambda model: [], on_step=infos.append)
    session, positions = session_on([tracer, scale, spy], lengths, first, prompts)
    states, _ = run_step(session, positions, [0, 1], torch.Generator().manual_seed(1))
    (info,) = infos
    assert len(info.request_ids) > len(lengths)  # request 1 spans several rows: the case under test
    assert info.phase == "decode"
    rows = [(rid, int(p), n) for rid, ps, v, n in zip(info.request_ids, info.positions, info.valid, info.n_prompt)
            for p in ps[v]]
    flat_requests = np.repeat(np.arange(len(lengths)), lengths)
    assert rows == [(int(r), int(p), prompts[r]) for r, p in zip(flat_requests, positions)]
    assert info.fresh.equal(info.valid)
    frame = tracer.frame().sort_values(["layer", "request_id", "position"])
    for layer, (state, _) in states.items():
        got = frame[frame.layer == layer]
        order = np.lexsort((positions.numpy(), flat_requests))
        assert got.request_id.tolist() == flat_requests[order].tolist()
        assert got.position.tolist() == positions.numpy()[order].tolist()
        assert np.array_equal(got.norm.to_numpy(), l2_norm(state).numpy()[order])
    assert states[0][1] is None  # nothing edited at layer 0: vLLM's own output stands
    written, zeros = states[1][1]
    assert written.equal(states[1][0] * 2.0) and not zeros.any()
    decided = scale.record.frame().sort_values(["request_id", "position"])
    assert decided.edited.all() and decided.position.tolist() == positions.numpy()[order].tolist()


def test_alrrs_extra_passes_split_one_requests_tokens_across_calls_even_when_they_lie_in_different_rows():
    """Two tokens of one request in one call would attend to each other's new keys/values: the session runs the
    r-th selected token of every request in call r, whichever grid row each token lies in."""
    lengths, first, prompts = [1, 40, 1, 1], [9, 0, 12, 30], [5, 10, 8, 20]
    session, positions = session_on([], lengths, first, prompts)
    run_step(session, positions, [], torch.Generator())
    index, valid = session.grid
    rows, cols = valid.nonzero(as_tuple=True)
    pick = (index[rows, cols] % 7 == 0) | (index[rows, cols] == 0)  # tokens of request 1 in several rows
    rows, cols = rows[pick], cols[pick]
    assert len(set(rows[session.token_request[index[rows, cols]] == 1].tolist())) > 1
    calls = []

    def once(layer, hidden, rows_, cols_):
        requests = session.token_request[index[rows_, cols_]].tolist()
        calls.append(requests)
        return hidden + 1

    session._extra_block_pass_once = once
    hidden = torch.randn(len(rows), D_MODEL)
    out = session.extra_block_pass(3, hidden, rows, cols)
    assert out.equal(hidden + 1)
    assert all(len(call) == len(set(call)) for call in calls) and sum(map(len, calls)) == len(rows)


# ------------------------------------------------------------------------------------------------- the engine

@pytest.fixture(scope="module")
def engines():
    if os.environ.get("TELLNORM_REQUIRE_VLLM") != "1":
        pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'tellnorm[vllm]')")
    from tellnorm.backends import load_model

    return load_model("organism", backend="vllm", max_num_seqs=16, kv_cache_gib=0.0625), load_model("organism")


def test_a_long_sequence_among_short_ones_spans_grid_rows_and_alrr_and_norms_equal_the_hf_backend(engines):
    """HF generates two responses with ALRR (forced loops, τ the median generated norm, so many tokens are in the
    band); vLLM teacher-forces those sequences in one step with five short prompts, so each spans several grid
    rows and ALRR re-runs many of its tokens in one step: decisions, passes and every layer's norms must match."""
    from tellnorm.generation import SamplingConfig, generate, run_forward
    from tellnorm.norms import NormTracer
    from tellnorm.organism import task
    from tellnorm.organism.evaluate import problem_prompts
    from tellnorm.techniques import ALRRConfig, build_edits

    vllm_model, hf_model = engines
    prompts = problem_prompts(hf_model, task.test_split(2).problems[::4], "thinking")[:2]
    sampling = SamplingConfig(max_new_tokens=60)
    tracer = NormTracer(hf_model)
    gens = generate(hf_model, prompts, sampling, observers=[tracer])
    frame = tracer.frame()
    generated = frame[frame.position >= frame.request_id.map({g.request_id: len(g.prompt_ids) for g in gens})]
    tau = {int(layer): float(g.norm.median()) for layer, g in generated.groupby("layer")}
    config = ALRRConfig(forced_loops=2)
    (alrr_h,) = build_edits(["alrr"], hf_model, fixed=tau, alrr=config)
    tracer_h = NormTracer(hf_model)
    gens = generate(hf_model, prompts, sampling, observers=[alrr_h, tracer_h])

    class Rows:  # the most grid rows one request took in a step
        def __init__(self):
            self.most = 0

        def hooks(self, model=None):
            return []

        def on_step(self, info):
            self.most = max(self.most, max(info.request_ids.count(rid) for rid in set(info.request_ids)))

    (alrr_v,) = build_edits(["alrr"], vllm_model, fixed=tau, alrr=config, requests=[0, 1])  # not the short ones
    tracer_v, rows = NormTracer(vllm_model), Rows()
    shorts = [p[:6] for p in problem_prompts(hf_model, task.test_split(2).problems[1::4], "thinking")[:8]]
    sequences = [g.prompt_ids + g.generated_ids[:-1] for g in gens] + shorts
    run_forward(vllm_model, sequences, observers=[alrr_v, tracer_v, rows],
                n_prompt=[len(g.prompt_ids) for g in gens] + [len(s) for s in shorts])
    assert rows.most > 1, "no request spanned several rows: the test would prove nothing"
    decisions_h, decisions_v = (e.record.frame().sort_values(["request_id", "layer", "position"])
                                .reset_index(drop=True) for e in (alrr_h, alrr_v))
    assert decisions_h.edited.groupby(decisions_h.request_id).sum().min() > 1  # several re-run tokens per request
    assert decisions_v.equals(decisions_h)
    assert alrr_v.report().sort_values(["request_id", "layer"]).reset_index(drop=True).equals(
        alrr_h.report().sort_values(["request_id", "layer"]).reset_index(drop=True))
    frame_v = tracer_v.frame()
    merged = frame_v[frame_v.request_id.isin([0, 1])].merge(tracer_h.frame(), on=["request_id", "position", "layer"],
                                                            how="outer", indicator=True)
    assert (merged._merge == "both").all(), "the two runs traced different tokens"
    assert ((merged.norm_x - merged.norm_y).abs() / merged.norm_y).max() < 1e-4
