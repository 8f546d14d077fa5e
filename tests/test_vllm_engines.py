"""vLLM's multi-process engine and tensor parallelism must measure exactly what the HF backend measures.

Across processes the observers run on copies inside vLLM's workers and their records come back into the caller's
objects; under ``tensor_parallel_size=2`` rank 0 decides and the other rank follows. References: the HF backend
(itself tested against HF's hidden states and a cache-free reference) for tokens, every layer's norms, technique
decisions and per-token statistics; the run is shuffled (request ids in a random order) into fewer slots than
requests, and the tensor-parallel engine's KV cache is small enough that vLLM preempts and recomputes requests.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from helpers import FinishLog, StaleCounter

from tellnorm.errors import TellnormError
from tellnorm.interventions import Scale

if os.environ.get("TELLNORM_REQUIRE_VLLM") != "1":  # `make test` sets it: there a missing vLLM is a failure
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'tellnorm[vllm]')")

NORM_RTOL = 1e-4  # the float32 tolerance (as tests/test_vllm_backend.py)
STAT_ATOL = 1e-4  # float32 log-probabilities (as tests/test_vllm_token_stats.py)
# vLLM's CPU workers bind their OpenMP threads to NUMA nodes, one per rank unless told: these machines have one node.
THREADS_BIND = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}


@pytest.fixture(scope="module")
def hf_model():
    from tellnorm.backends import load_model

    return load_model("organism")


@pytest.fixture(scope="module")
def prompts(hf_model):
    from tellnorm.organism import task
    from tellnorm.organism.evaluate import problem_prompts

    return problem_prompts(hf_model, task.test_split(2).problems[::2], "thinking")  # 10 prompts, 22..76 tokens


@pytest.fixture(scope="module")
def multi_process(hf_model):
    """vLLM's engine core in its own process (vLLM's default), 3 slots for 10 requests."""
    from tellnorm.backends import load_model

    model = load_model("organism", backend="vllm", engine="multi-process", max_num_seqs=3, kv_cache_gib=0.0625)
    yield model
    model.shutdown()  # its processes end with the module, not at interpreter exit
    assert not Path(model.info["socket_dir"]).exists(), "shutdown left the engine's socket folder behind"


@pytest.fixture(scope="module")
def tensor_parallel(hf_model):
    """Two tensor-parallel ranks (the organism's 2 KV heads, one each), 8 slots and a KV cache of ≈ 350 tokens per
    rank for 10 requests of up to ~200: vLLM preempts and recomputes."""
    from tellnorm.backends import load_model

    mp = pytest.MonkeyPatch()
    for key, value in THREADS_BIND.items():
        mp.setenv(key, value)
    try:
        model = load_model("organism", backend="vllm", engine="multi-process", tensor_parallel_size=2,
                           max_num_seqs=8, max_model_len=256, kv_cache_gib=1.5 / 1024)
    finally:
        mp.undo()
    yield model
    model.shutdown()


@pytest.fixture(scope="module")
def tau(hf_model, prompts):
    """Calibrated τ per layer (Q3 + 1.5·IQR) from HF's greedy responses to the test prompts."""
    from tellnorm.generation import SamplingConfig
    from tellnorm.thresholds import calibrated_thresholds

    gens, frame = traced(hf_model, prompts, list(range(len(prompts))), SamplingConfig(max_new_tokens=120))
    n_prompt = frame.request_id.map({i: len(g.prompt_ids) for i, g in enumerate(gens)})
    generated = frame[frame.position >= n_prompt]
    return calibrated_thresholds({layer: g.norm.to_numpy() for layer, g in generated.groupby("layer")})


def test_a_multi_process_engine_keeps_its_sockets_in_a_folder_of_its_own(multi_process):
    """vLLM makes its IPC sockets in the temp directory and never removes them; tellnorm gives each multi-process
    engine its own folder (removed at shutdown, checked when the fixture ends, or at exit)."""
    import stat
    import tempfile

    folder = Path(multi_process.info["socket_dir"])
    assert folder.parent == Path(tempfile.gettempdir()) and folder.name.startswith("tellnorm-vllm-sockets-")
    assert any(stat.S_ISSOCK(entry.stat().st_mode) for entry in folder.iterdir()), "vLLM made no socket there"


def traced(model, prompts, request_ids, sampling, observers=(), token_stats=False):
    from tellnorm.generation import generate
    from tellnorm.norms import NormTracer

    tracer = NormTracer(model)
    gens = generate(model, prompts, sampling, observers=list(observers) + [tracer], request_ids=request_ids,
                    token_stats=token_stats)
    return gens, tracer.frame()


def techniques(model, tau):
    """ALRR with two forced loops (kept passes change the stream) and ERSS with short streaks (it injects)."""
    from tellnorm.techniques import ALRRConfig, ERSSConfig, build_edits

    return build_edits(["alrr", "erss"], model, fixed=tau, alrr=ALRRConfig(forced_loops=2),
                       erss=ERSSConfig(low_k=3, p_inject=1.0, cos_min=-1.0, cooldown=2))


def by_request(gens):
    return {g.request_id: g for g in gens}


def sorted_frame(frame, keys):
    return frame.sort_values(keys).reset_index(drop=True)


@pytest.mark.parametrize("engine", ["multi_process", pytest.param("tensor_parallel", marks=pytest.mark.slow)])
def test_tokens_norms_decisions_and_token_stats_equal_the_hf_backend(engine, hf_model, prompts, tau, request):
    from tellnorm.generation import TOKEN_STATS, SamplingConfig

    model = request.getfixturevalue(engine)
    sampling = SamplingConfig(max_new_tokens=120)
    order = np.random.default_rng(0).permutation(len(prompts)).tolist()  # requests arrive shuffled
    counter = StaleCounter()
    edits_v = techniques(model, tau)
    gens_v, frame_v = traced(model, [prompts[i] for i in order], order, sampling, edits_v + [counter],
                             token_stats=True)
    edits_h = techniques(hf_model, tau)
    gens_h, frame_h = traced(hf_model, prompts, list(range(len(prompts))), sampling, edits_h, token_stats=True)

    mine, reference = by_request(gens_v), by_request(gens_h)
    assert {rid: g.generated_ids for rid, g in mine.items()} == {rid: g.generated_ids for rid, g in reference.items()}
    merged = frame_v.merge(frame_h, on=["request_id", "position", "layer"], how="outer", indicator=True)
    assert (merged._merge == "both").all(), "the two runs traced different tokens"
    relative = ((merged.norm_x - merged.norm_y).abs() / merged.norm_y).max()
    assert relative < NORM_RTOL, f"max relative norm difference {relative:.2e}"
    for edit_v, edit_h in zip(edits_v, edits_h):
        keys = ["request_id", "layer", "position"]
        assert sorted_frame(edit_v.record.frame(), keys).equals(sorted_frame(edit_h.record.frame(), keys))
        assert edit_h.record.frame().edited.sum() > 0, f"{edit_h.name} never fired: the test would prove nothing"
        keys = ["request_id", "layer"]
        assert sorted_frame(edit_v.report(), keys).equals(sorted_frame(edit_h.report(), keys))
    for rid, g in reference.items():
        for name in TOKEN_STATS:
            np.testing.assert_allclose(mine[rid].meta[name], g.meta[name], atol=STAT_ATOL, rtol=0)
    if engine == "tensor_parallel":
        assert counter.stale > 0, "no request was preempted: the test would prove nothing"
        assert [list(place) for place in model.llm.collective_rpc("tellnorm_rank")] == [[0, 2], [1, 2]]


class Raises:
    """An observer whose hook raises at its ``after``-th call, with an exception that cannot be pickled."""

    edits_stream = False

    def __init__(self, model, after):
        self.name, self.calls, self.after = "raises", 0, after
        self.hook_name = model.hook_name(1)

    def hooks(self, model):
        return [(self.hook_name, self.hook)]

    def on_step(self, info):
        pass

    def hook(self, x, hook):
        self.calls += 1
        if self.calls >= self.after:
            raise Unpicklable("a bug in an observer")


class Unpicklable(RuntimeError):
    def __reduce__(self):
        raise TypeError("not picklable")


class RaisesOnRelease(Raises):
    """Lets go of finished requests with an error (the worker calls ``release`` between steps, not in a hook)."""

    def hook(self, x, hook):
        return None

    def release(self, request_ids):
        raise ValueError(f"cannot release {sorted(request_ids)}")


class BadHook(Raises):
    """Asks for a hook point the vLLM backend does not have (refused inside the worker)."""

    def hooks(self, model):
        return [("blocks.0.hook_resid_pre", self.hook)]


class UndeclaredScale(Scale):
    """A scale edit that claims to only record."""

    edits_stream = False


def test_a_workers_error_reaches_the_caller_in_one_line_and_the_engine_stays_usable(multi_process, prompts):
    from tellnorm.generation import SamplingConfig, generate

    sampling = SamplingConfig(max_new_tokens=40)
    before = generate(multi_process, prompts[:3], sampling)
    with pytest.raises(TellnormError) as err:
        generate(multi_process, prompts[:3], sampling, observers=[Raises(multi_process, after=5)])
    assert str(err.value) == "Unpicklable in vLLM's worker: a bug in an observer"
    assert not multi_process.llm.llm_engine.has_unfinished_requests()
    after = generate(multi_process, prompts[:3], sampling)  # the engine is usable, nothing left attached
    assert [g.generated_ids for g in after] == [g.generated_ids for g in before]
    assert multi_process.llm.collective_rpc("tellnorm_poll", args=([],)) == [None]


def test_an_error_while_letting_go_of_finished_requests_reaches_the_caller(multi_process, prompts):
    from tellnorm.generation import SamplingConfig, generate

    with pytest.raises(ValueError, match=r"^cannot release \['r\d'(, 'r\d')*\]$"):
        generate(multi_process, prompts[:4], SamplingConfig(max_new_tokens=40), observers=[RaisesOnRelease(
            multi_process, after=0)], request_ids=[f"r{i}" for i in range(4)])
    assert not multi_process.llm.llm_engine.has_unfinished_requests()
    assert generate(multi_process, prompts[:1], SamplingConfig(max_new_tokens=4))[0].generated_ids


def test_what_cannot_cross_processes_is_refused_in_one_line(multi_process, prompts):
    from tellnorm.generation import SamplingConfig, generate
    from tellnorm.norms import NormTracer

    tracer = NormTracer(multi_process, layers=[0])
    tracer.callback = lambda: None  # a lambda cannot be pickled
    with pytest.raises(TellnormError) as err:
        generate(multi_process, prompts[:1], SamplingConfig(max_new_tokens=4), observers=[tracer])
    assert str(err.value).startswith("observer 'NormTracer' cannot be sent to vLLM's worker processes")

    with pytest.raises(TellnormError) as err:  # raised inside the worker, received as itself
        generate(multi_process, prompts[:1], SamplingConfig(max_new_tokens=4), observers=[BadHook(multi_process, 1)])
    assert "hook 'blocks.0.hook_resid_pre' is not available on the vLLM backend" in str(err.value)
    assert generate(multi_process, prompts[:1], SamplingConfig(max_new_tokens=4))[0].generated_ids


def test_records_return_into_the_callers_own_objects(multi_process, hf_model, prompts):
    from tellnorm.generation import SamplingConfig, generate
    from tellnorm.norms import NormTracer

    tracer = NormTracer(multi_process, layers=[2])
    generate(multi_process, prompts[:2], SamplingConfig(max_new_tokens=8), observers=[tracer])
    _, frame_h = traced(hf_model, prompts[:2], [0, 1], SamplingConfig(max_new_tokens=8))
    assert tracer.model is multi_process  # the caller's object, its model reference restored
    assert len(tracer.frame()) == len(frame_h[frame_h.layer == 2]) > 0
    pickle.dumps(tracer.frame())  # plain records, no engine inside


def test_finished_requests_records_leave_the_worker_while_the_run_goes_on(multi_process, prompts):
    """10 requests through 3 slots: all but the last to finish hand their records over within a few polls of
    their last step, not when the run ends; the caller's object gets every part back, in order."""
    from tellnorm.backends.vllm.remote import POLL_EVERY
    from tellnorm.generation import SamplingConfig, generate

    log = FinishLog()
    generate(multi_process, prompts, SamplingConfig(max_new_tokens=60), observers=[log],
             request_ids=[f"r{i}" for i in range(len(prompts))])
    early = {rid: lag for kind, lags in log.parts if kind == "finished" for rid, lag in lags.items()}
    late = {rid for kind, lags in log.parts if kind == "end" for rid in lags}
    assert early.keys() | late == {f"r{i}" for i in range(len(prompts))} and not early.keys() & late
    assert len(early) >= len(prompts) - 3, f"only {sorted(early)} came back before the run ended"
    assert max(early.values()) <= 2 * POLL_EVERY, f"records left {max(early.values())} steps after their request"
    assert [kind for kind, _ in log.parts][-1] == "end" and log.last == {}


@pytest.mark.slow
def test_an_observer_that_declares_it_only_records_may_not_edit_under_tensor_parallelism(tensor_parallel, prompts):
    from tellnorm.generation import SamplingConfig, generate

    edit = UndeclaredScale(tensor_parallel, [1], factor=1.5)
    with pytest.raises(TellnormError) as err:
        generate(tensor_parallel, prompts[:2], SamplingConfig(max_new_tokens=8), observers=[edit])
    assert "declares edits_stream = False changed the stream at layer 1" in str(err.value)
    assert generate(tensor_parallel, prompts[:2], SamplingConfig(max_new_tokens=8))[0].generated_ids
