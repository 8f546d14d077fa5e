"""The vLLM backend must measure exactly what the HF backend measures, per request, whatever vLLM's batching does.

References: the HF backend (itself tested against HF's own hidden states and a cache-free reference) for tokens,
every layer's norms, technique decisions and firing counts; running a request alone for slot reuse; a teacher-forced
HF pass over each sampled child's own sequence for ``n > 1``. The engine is in-process; vLLM pins torch to one
thread once it starts, so this module runs last (file order) and shares one engine per model.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from helpers import StaleCounter

from tellnorm.errors import TellnormError

if os.environ.get("TELLNORM_REQUIRE_VLLM") != "1":  # `make test` sets it: there a missing vLLM is a failure
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'tellnorm[vllm]')")

MAX_NUM_SEQS = 3  # fewer than the requests of most tests, so slots are reused and requests wait their turn
NORM_RTOL = 1e-4  # the float32 tolerance; measured max relative difference ≈ 3e-6


@pytest.fixture(scope="module")
def engines():
    from tellnorm.backends import load_model

    vllm_model = load_model("organism", backend="vllm", max_num_seqs=MAX_NUM_SEQS, kv_cache_gib=0.0625)
    return vllm_model, load_model("organism")


@pytest.fixture(scope="module")
def prompts(engines):
    from tellnorm.organism import task
    from tellnorm.organism.evaluate import problem_prompts

    split = task.test_split(2)  # two per difficulty: 10 difficulties, prompt lengths 22..76
    return problem_prompts(engines[1], split.problems[::2], "thinking")


def traced(model, prompts, sampling, observers=(), request_ids=None):
    from tellnorm.generation import generate
    from tellnorm.norms import NormTracer

    tracer = NormTracer(model)
    gens = generate(model, prompts, sampling, observers=list(observers) + [tracer], request_ids=request_ids)
    return gens, tracer.frame()


def assert_norms_match(frame_a, frame_b, rtol=NORM_RTOL):
    merged = frame_a.merge(frame_b, on=["request_id", "position", "layer"], how="outer", indicator=True)
    assert (merged._merge == "both").all(), "the two runs traced different tokens"
    relative = ((merged.norm_x - merged.norm_y).abs() / merged.norm_y).to_numpy()
    assert relative.max() < rtol, f"max relative norm difference {relative.max():.2e}"
    return merged


def test_greedy_tokens_and_every_layers_norms_equal_the_hf_backend(engines, prompts):
    from tellnorm.generation import SamplingConfig

    vllm_model, hf_model = engines
    sampling = SamplingConfig(max_new_tokens=120)
    gens_v, frame_v = traced(vllm_model, prompts, sampling)
    gens_h, frame_h = traced(hf_model, prompts, sampling)
    assert [g.generated_ids for g in gens_v] == [g.generated_ids for g in gens_h]
    assert [g.finish_reason for g in gens_v] == [g.finish_reason for g in gens_h]
    assert {g.finish_reason for g in gens_h} == {"eos", "length"}  # both stop rules exercised
    merged = assert_norms_match(frame_v, frame_h)
    n_prompt = merged.request_id.map({i: len(p) for i, p in enumerate(prompts)})
    assert (merged.position < n_prompt).sum() > 0 and (merged.position >= n_prompt).sum() > 0  # prefill and decode
    assert set(merged.layer) == set(range(hf_model.n_layers))


def test_position_zero_is_traced_with_its_massive_norm(engines, prompts):
    from tellnorm.generation import SamplingConfig

    _, frame = traced(engines[0], prompts[:2], SamplingConfig(max_new_tokens=4))
    first = frame[frame.position == 0]
    assert len(first) == 2 * engines[0].n_layers
    _, reference = traced(engines[1], prompts[:2], SamplingConfig(max_new_tokens=4))
    assert_norms_match(first, reference[reference.position == 0])


def test_a_request_traces_the_same_alone_as_among_more_requests_than_slots(engines, prompts):
    """Slots are reused (10 requests, 3 slots) and arrival order varies: every request equals its solo run."""
    from tellnorm.generation import SamplingConfig

    vllm_model, _ = engines
    sampling = SamplingConfig.paper(max_new_tokens=60, seed=7)  # sampled: per-request seeds must follow requests
    order = [7, 2, 9, 0, 5, 3, 8, 1, 6, 4]
    ids = [f"r{i}" for i in order]
    gens, frame = traced(vllm_model, [prompts[i] for i in order], sampling, request_ids=ids)
    for rid, i in zip(ids, order):
        solo_gens, solo_frame = traced(vllm_model, [prompts[i]], sampling, request_ids=[rid])
        gen = next(g for g in gens if g.request_id == rid)
        assert gen.generated_ids == solo_gens[0].generated_ids, rid
        assert_norms_match(frame[frame.request_id == rid], solo_frame, rtol=1e-5)
    assert len({tuple(g.generated_ids) for g in gens}) == len(gens)


def test_children_of_an_n_2_request_keep_their_own_traces(engines, prompts):
    """Each child's traced norms equal a teacher-forced HF pass over that child's own tokens."""
    from vllm import SamplingParams

    from tellnorm.generation import run_forward
    from tellnorm.norms import NormTracer

    vllm_model, hf_model = engines
    tracer = NormTracer(vllm_model)
    params = SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=40, extra_args={"tellnorm_request": 0})
    (out,) = vllm_model.run([prompts[3]], [params], observers=[tracer], request_ids=["p"])
    frame = tracer.frame()
    assert set(frame.request_id) == {("p", 0), ("p", 1)}
    children = [list(prompts[3]) + list(c.token_ids)[:-1] for c in out.outputs]  # the last token is never fed
    assert children[0] != children[1]
    reference = NormTracer(hf_model)
    run_forward(hf_model, children, observers=[reference], request_ids=[("p", 0), ("p", 1)])
    assert_norms_match(frame, reference.frame())


def decisions(edit):
    """An edit's decisions, one row per (request, layer, position), in that order."""
    return edit.record.frame().sort_values(["request_id", "layer", "position"]).reset_index(drop=True)


def report(edit):
    """An edit's per-(request, layer) report, in that order."""
    return edit.report().sort_values(["request_id", "layer"]).reset_index(drop=True)


def technique_edits(model, names, tau, **configs):
    from tellnorm.techniques import build_edits

    return build_edits(names, model, fixed=tau, **configs)


@pytest.fixture(scope="module")
def tau(engines, prompts):
    """Calibrated τ per layer (Q3 + 1.5·IQR) from HF's greedy responses to the test prompts."""
    from tellnorm.generation import SamplingConfig
    from tellnorm.thresholds import calibrated_thresholds

    gens, frame = traced(engines[1], prompts, SamplingConfig(max_new_tokens=120))
    n_prompt = frame.request_id.map({i: len(g.prompt_ids) for i, g in enumerate(gens)})
    generated = frame[frame.position >= n_prompt]
    return calibrated_thresholds({layer: g.norm.to_numpy() for layer, g in generated.groupby("layer")})


@pytest.mark.parametrize("names, configs", [
    (["alrr"], {}),
    (["alrr"], {"alrr": "forced"}),  # the loop ablation: two kept passes per band token, outputs change
    (["erss"], {"erss": "eager"}),  # short streaks so ERSS injects
    (["alrr", "erss"], {"erss": "eager"}),
])
def test_technique_decisions_tokens_and_norms_equal_the_hf_backend(engines, prompts, tau, names, configs):
    from tellnorm.generation import SamplingConfig
    from tellnorm.techniques import ALRRConfig, ERSSConfig

    built = {"alrr": ALRRConfig(forced_loops=2) if configs.get("alrr") == "forced" else None,
             "erss": ERSSConfig(low_k=3, p_inject=1.0, cos_min=-1.0, cooldown=2) if configs.get("erss") else None}
    sampling = SamplingConfig(max_new_tokens=120)
    results = {}
    for model in engines:
        edits = technique_edits(model, names, tau, alrr=built["alrr"], erss=built["erss"])
        gens, frame = traced(model, prompts, sampling, observers=edits)
        results[model.backend] = (gens, frame, edits)
    (gens_v, frame_v, edits_v), (gens_h, frame_h, edits_h) = results["vllm"], results["hf"]
    assert [g.generated_ids for g in gens_v] == [g.generated_ids for g in gens_h]
    assert_norms_match(frame_v, frame_h)
    for edit_v, edit_h in zip(edits_v, edits_h):
        assert decisions(edit_v).equals(decisions(edit_h))
        assert decisions(edit_h).edited.sum() > 0, f"{edit_h.name} never fired: the test would prove nothing"
        assert report(edit_v).equals(report(edit_h))
    if "erss" in names:
        assert results["hf"][2][-1].report().erss_injections.sum() > 0


class CacheWatch:
    """Two observers around ALRR at its layer: the first copies that layer's paged KV cache, the second checks it
    is unchanged after ALRR's extra passes ran (the small test cache makes a full copy cheap)."""

    def __init__(self, model, layer):
        from tellnorm.generation import LayerHooks

        watch = self

        class Before(LayerHooks):
            def hook_for(self, layer):
                def hook(x, hook):
                    watch.copy = watch.cache().clone()
                return hook

        class After(LayerHooks):
            def hook_for(self, layer):
                def hook(x, hook):
                    watch.checked += 1
                    watch.changed += int(not watch.cache().equal(watch.copy))
                return hook

        self.before, self.after = Before(model, [layer]), After(model, [layer])
        self.layer, self.checked, self.changed = layer, 0, 0

    def cache(self):
        session = self.before.info.backend
        return session.engine_model.tellnorm_attention(session.layers[self.layer]).kv_cache


def test_alrr_extra_passes_leave_the_paged_kv_cache_unchanged(engines, prompts, tau):
    from tellnorm.generation import SamplingConfig, generate
    from tellnorm.techniques import ALRRConfig

    vllm_model, _ = engines
    (alrr,) = technique_edits(vllm_model, ["alrr"], tau, alrr=ALRRConfig(forced_loops=2))
    (layer,) = alrr.layers
    watch = CacheWatch(vllm_model, layer)
    generate(vllm_model, prompts[:4], SamplingConfig(max_new_tokens=60), observers=[watch.before, alrr, watch.after])
    assert alrr.report().alrr_extra_passes.sum() > 0
    assert watch.checked > 60 and watch.changed == 0


def test_teacher_forced_passes_equal_the_hf_backend(engines, prompts):
    from tellnorm.generation import run_forward
    from tellnorm.norms import NormTracer

    frames = []
    for model in engines:
        tracer = NormTracer(model, [0, 6])
        run_forward(model, prompts[:5], observers=[tracer], n_prompt=[10] * 5)
        frames.append(tracer.frame())
    assert_norms_match(*frames)


def test_hooks_are_removed_when_an_observer_raises(engines, prompts):
    from tellnorm.generation import LayerHooks, SamplingConfig, generate

    vllm_model, _ = engines

    class Boom(LayerHooks):
        def hook_for(self, layer):
            def hook(x, hook):
                if self.info.step == 3:
                    raise RuntimeError("boom")
            return hook

    sampling = SamplingConfig(max_new_tokens=8)
    before = generate(vllm_model, prompts[:2], sampling)
    with pytest.raises(Exception, match="boom"):
        generate(vllm_model, prompts[:2], sampling, observers=[Boom(vllm_model, [2])])
    runner = vllm_model.llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    modules = [runner.model] + runner.model.tellnorm_layers()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in modules)
    assert "tellnorm_step_start" not in vars(runner.model)  # the step announcement is gone too
    after = generate(vllm_model, prompts[:2], sampling)
    assert [g.generated_ids for g in after] == [g.generated_ids for g in before]


# ------------------------------------------------------------------------------------- tiny real architectures

@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_tiny_random_architectures_equal_the_hf_backend(arch, tmp_path):
    """Qwen2 (R1-Distill-Qwen) and Llama (R1-Distill-Llama) through the plugin: tokens and every layer's norms."""
    import torch
    from conftest import SPECIAL, TINY_INIT_RANGE, WORDS, build_tiny_tokenizer_for
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from tellnorm.backends import load_model
    from tellnorm.generation import SamplingConfig

    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS)}
    config = {"qwen2": Qwen2Config, "llama": LlamaConfig}[arch](
        vocab_size=len(vocab), num_hidden_layers=2, hidden_size=64, num_attention_heads=2, num_key_value_heads=1,
        head_dim=32, intermediate_size=128, max_position_embeddings=128, initializer_range=TINY_INIT_RANGE,
        pad_token_id=vocab["<pad>"], eos_token_id=vocab["<|im_end|>"], bos_token_id=vocab["<s>"])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp_path)
    build_tiny_tokenizer_for(arch).save_pretrained(tmp_path)
    hf_model = load_model(tmp_path)
    vllm_model = load_model(tmp_path, backend="vllm", kv_cache_gib=0.03125)
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(len(SPECIAL), len(vocab), size=n)] for n in (5, 9, 17)]
    sampling = SamplingConfig(max_new_tokens=20)
    gens_v, frame_v = traced(vllm_model, prompts, sampling)
    gens_h, frame_h = traced(hf_model, prompts, sampling)
    assert [g.generated_ids for g in gens_v] == [g.generated_ids for g in gens_h]
    assert_norms_match(frame_v, frame_h)


MORE_ARCHS = ("Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM", "MistralForCausalLM", "Ministral3ForCausalLM",
              "MixtralForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM",
              "OlmoeForCausalLM", "Glm4ForCausalLM", "NemotronForCausalLM", "Exaone4ForCausalLM",
              "StableLmForCausalLM", "GraniteForCausalLM", "GraniteMoeForCausalLM", "GptOssForCausalLM",
              "Glm4MoeForCausalLM", "Ernie4_5ForCausalLM", "ApertusForCausalLM")
MOE_ARCHS = ("Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM", "MixtralForCausalLM", "OlmoeForCausalLM",
             "GraniteMoeForCausalLM", "GptOssForCausalLM", "Glm4MoeForCausalLM")
# every run: one MoE, sliding windows, and one of each stream rule (Granite's layers return the whole stream alone)
QUICK_ARCHS = ("Qwen3MoeForCausalLM", "MistralForCausalLM", "Gemma3ForCausalLM", "GraniteForCausalLM")


def test_every_tapped_architecture_is_tested():
    from tellnorm.backends.vllm.plugin import TAPPED_ARCHITECTURES

    assert set(TAPPED_ARCHITECTURES) == {"Qwen3ForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM", *MORE_ARCHS}


@pytest.mark.parametrize("arch", [a if a in QUICK_ARCHS else pytest.param(a, marks=pytest.mark.slow)
                                  for a in MORE_ARCHS])
def test_more_architectures_trace_and_edit_as_the_hf_backend(arch, tmp_path, monkeypatch):
    """Each tapped architecture on a tiny random model (test_architectures' table; head size 32, which vLLM's CPU
    attention needs): tokens, every layer's norms, and ALRR (two forced loops) and ERSS (eager streaks) decisions
    equal the HF backend's, with τ at each layer's median norm so both fire."""
    import json
    import subprocess
    import sys

    import test_architectures as table
    from vllm.distributed import parallel_state

    from tellnorm.backends import load_model
    from tellnorm.generation import SamplingConfig
    from tellnorm.techniques import ALRRConfig, ERSSConfig, build_edits
    from tellnorm.thresholds import FixedThresholds

    if arch in MOE_ARCHS and parallel_state.model_parallel_is_initialized() and parallel_state._EP is None:
        # a dense engine set up this process's parallel state: the MoE engine runs in its own process
        node = f"{__file__}::test_more_architectures_trace_and_edit_as_the_hf_backend[{arch}]"
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", node],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout[-3000:]
        return
    monkeypatch.setitem(table.DIMS, "head_dim", 32)
    monkeypatch.setitem(table.DIMS, "hidden_size", 128)
    table.build(arch).save_pretrained(tmp_path)
    table.tokenizer_for(arch).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    if "head_dim" not in config:  # released GLM-4.5 checkpoints carry it; transformers' config class drops it
        (tmp_path / "config.json").write_text(json.dumps({**config, "head_dim": table.DIMS["head_dim"]}))
    hf_model = load_model(tmp_path)
    vllm_model = load_model(tmp_path, backend="vllm", kv_cache_gib=0.03125)
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(8, 90, size=n)] for n in (5, 9, 17)]
    sampling = SamplingConfig(max_new_tokens=20)
    _, plain = traced(hf_model, prompts, sampling)
    tau = FixedThresholds({int(layer): float(g.norm.median()) for layer, g in plain.groupby("layer")})
    results = {}
    for model in (hf_model, vllm_model):
        edits = build_edits(["alrr", "erss"], model, fixed=tau, alrr=ALRRConfig(forced_loops=2),
                            erss=ERSSConfig(low_k=3, p_inject=1.0, cos_min=-1.0, cooldown=2))
        gens, frame = traced(model, prompts, sampling, observers=edits)
        results[model.backend] = gens, frame, edits
    (gens_h, frame_h, edits_h), (gens_v, frame_v, edits_v) = results["hf"], results["vllm"]
    assert [g.generated_ids for g in gens_v] == [g.generated_ids for g in gens_h]
    assert_norms_match(frame_v, frame_h)
    for edit_h, edit_v in zip(edits_h, edits_v):
        assert decisions(edit_h).equals(decisions(edit_v))
    assert edits_h[0].report().alrr_kept_passes.sum() > 0  # ALRR's kept passes changed the stream


# ---------------------------------------------------------------------------------------------------- bad input

def one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_an_architecture_the_plugin_does_not_tap_is_refused_before_vllm_starts(tmp_path):
    from tellnorm.backends import load_model

    (tmp_path / "config.json").write_text('{"architectures": ["Olmo2ForCausalLM"], "num_hidden_layers": 2}')
    with pytest.raises(TellnormError) as err:
        load_model(tmp_path, backend="vllm")
    assert "Olmo2ForCausalLM is not supported by tellnorm's vLLM plugin" in one_line(err)


@pytest.mark.parametrize("arch, reason", [("Qwen3_5ForConditionalGeneration", "needs torchvision"),
                                          ("Qwen3NextForCausalLM", "runs only in bfloat16")])
def test_hybrid_models_are_refused_on_vllm_with_the_reason(arch, reason, tmp_path):
    from tellnorm.backends import load_model

    (tmp_path / "config.json").write_text(f'{{"architectures": ["{arch}"], "num_hidden_layers": 2}}')
    with pytest.raises(TellnormError) as err:
        load_model(tmp_path, backend="vllm")
    message = one_line(err)
    assert f"{arch} is not supported on the vLLM backend because" in message and reason in message
    assert "linear-attention state caches" in message and "use backend='hf'" in message


@pytest.mark.parametrize("version", ["0.31.2", "0.33.0", "1.0.0", "dev"])
def test_vllm_versions_outside_the_pinned_range_are_refused(version):
    from tellnorm.backends.vllm import check_vllm_version

    with pytest.raises(TellnormError) as err:
        check_vllm_version(version)
    assert f"vLLM {version} is not supported" in one_line(err)
    check_vllm_version("0.32.0")
    check_vllm_version("0.32.1+cpu")


def test_what_the_backend_cannot_run_is_refused_in_one_line(engines, prompts):
    from tellnorm.generation import SamplingConfig, generate, run_forward
    from tellnorm.norms import NormTracer

    vllm_model, _ = engines
    cases = [
        (lambda: NormTracer(vllm_model, [1], point="mlp_out"), "hook point 'mlp_out' is not available"),
        (lambda: generate(vllm_model, prompts[:1], SamplingConfig(max_new_tokens=2), reuse_cache=False),
         "runs on the HF backend only"),
        (lambda: run_forward(vllm_model, prompts[:1], return_logits=True), "HF backend only"),
        (lambda: vllm_model.bridge, "load the model with backend='hf'"),
        (lambda: vllm_model.hf_model, "load the model with backend='hf'"),
    ]
    for call, message in cases:
        with pytest.raises(TellnormError) as err:
            call()
        assert message in one_line(err)


def test_a_request_vllm_refuses_aborts_the_run_and_leaves_the_engine_usable(engines, prompts):
    """A prompt longer than the engine's context, third of four: one line naming it, the two requests added
    before it aborted (nothing in flight, the engine not marked broken), and the next run as if nothing happened."""
    from tellnorm.generation import SamplingConfig, generate

    vllm_model, hf_model = engines
    sampling = SamplingConfig(max_new_tokens=4)
    too_long = [1] * (vllm_model.max_positions + 5)
    batch = [prompts[0], prompts[1], too_long, prompts[2]]
    params = [vllm_model.sampling_params(0, sampling, tag, tag, max_tokens=4) for tag in range(len(batch))]
    with pytest.raises(TellnormError) as err:
        vllm_model.run(batch, params, request_ids=["a", "b", "long", "d"])
    assert "vLLM refused request 'long'" in one_line(err)
    assert not vllm_model.llm.llm_engine.has_unfinished_requests() and not vllm_model.info.get("broken")
    after = generate(vllm_model, prompts[:3], sampling)
    assert [g.generated_ids for g in after] == [g.generated_ids for g in generate(hf_model, prompts[:3], sampling)]


def test_one_session_at_a_time_per_engine(engines, prompts):
    from tellnorm.generation import SamplingConfig, generate

    vllm_model, _ = engines
    with vllm_model.observe([]):
        with pytest.raises(TellnormError) as err, vllm_model.observe([]):
            pass
        assert "already attached to this vLLM engine" in one_line(err)
    [gen] = generate(vllm_model, prompts[:1], SamplingConfig(max_new_tokens=2, ignore_eos=True))
    assert len(gen.generated_ids) == 2


@pytest.mark.parametrize("technique", ["alrr", "erss"])
def test_pooled_thresholds_are_refused_on_vllm_whose_scheduler_decides_who_shares_a_step(engines, prompts,
                                                                                          technique):
    from tellnorm.generation import SamplingConfig, generate
    from tellnorm.techniques import build_edits

    vllm_model, _ = engines
    pooled = build_edits([technique], vllm_model, threshold_mode="pooled-p2")
    per_request = build_edits([technique], vllm_model, threshold_mode="exact")
    assert [e.pools_requests() for e in pooled] == [True] and [e.pools_requests() for e in per_request] == [False]
    with pytest.raises(TellnormError) as err:
        generate(vllm_model, prompts[:2], SamplingConfig(max_new_tokens=2), observers=pooled)
    assert "pooled-p2 thresholds pool each step's norms" in one_line(err)
    assert not vllm_model.info.get("attached")
    generate(vllm_model, prompts[:2], SamplingConfig(max_new_tokens=2), observers=per_request)


def test_an_edit_object_serves_one_run_on_vllm_too(engines, prompts):
    """vLLM steps mix new and running requests, so the reuse check runs before the run, not at a prefill."""
    from tellnorm.generation import SamplingConfig, generate
    from tellnorm.interventions.edits import Scale

    vllm_model, _ = engines
    edit = Scale(vllm_model, [1], 0.5)
    generate(vllm_model, prompts[:2], SamplingConfig(max_new_tokens=2), observers=[edit], request_ids=["a", "b"])
    with pytest.raises(TellnormError) as err:
        generate(vllm_model, prompts[:2], SamplingConfig(max_new_tokens=2), observers=[edit], request_ids=["c", "b"])
    assert "already edited request 'b'" in one_line(err) and "one edit object serves one run" in one_line(err)
    edit.reset()
    generate(vllm_model, prompts[:2], SamplingConfig(max_new_tokens=2), observers=[edit], request_ids=["c", "b"])


def test_an_moe_model_after_a_dense_engine_is_refused_in_one_line(engines, tmp_path):
    """vLLM creates its expert group only when a process's first engine is MoE (the organism's is not)."""
    from tellnorm.backends import load_model
    from tellnorm.backends.vllm import check_parallel_state

    (tmp_path / "config.json").write_text('{"architectures": ["Qwen3MoeForCausalLM"], "num_hidden_layers": 2, '
                                          '"num_experts": 4}')
    with pytest.raises(TellnormError) as err:
        load_model(tmp_path, backend="vllm")
    assert "is a mixture-of-experts model, and this process already runs a vLLM engine of a dense model" in (
        one_line(err))
    check_parallel_state({"num_hidden_layers": 2}, "dense")  # a dense model is fine


def test_vllms_own_switch_selects_the_multi_process_engine(monkeypatch):
    from tellnorm.backends import load_model
    from tellnorm.backends.vllm import default_engine_mode

    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    assert default_engine_mode() == "in-process"
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    assert default_engine_mode() == "multi-process"
    with pytest.raises(TellnormError) as err:
        load_model("organism", backend="vllm", engine="threads")
    assert "engine 'threads' is not a vLLM engine mode" in one_line(err)


def test_the_v1_model_runner_is_selected_through_vllms_own_setting(monkeypatch, engines):
    from tellnorm.backends.vllm import _import_vllm
    from tellnorm.backends.vllm.session import Session

    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(TellnormError) as err:
        _import_vllm()
    assert "VLLM_USE_V2_MODEL_RUNNER is set" in one_line(err)
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER")
    _import_vllm()
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    runner_v2 = type("CPUModelRunner", (), {"model": None, "query_start_loc": None})()  # no input_batch/requests
    with pytest.raises(TellnormError) as err:
        Session(engines[0], []).attach(runner_v2)
    assert "lacks what tellnorm's session reads (input_batch, requests)" in one_line(err)


def test_unknown_backend_and_stray_engine_options_are_refused():
    from tellnorm.backends import load_model

    with pytest.raises(TellnormError) as err:
        load_model("organism", backend="sglang")
    assert "unknown backend 'sglang'" in one_line(err)
    with pytest.raises(TellnormError) as err:
        load_model("organism", max_num_seqs=2)
    assert "apply to backend='vllm' only" in one_line(err)


@pytest.mark.parametrize("option,value,reason", [
    ("enforce_eager", False, "hooks do not fire inside vLLM's compiled graphs"),
    ("enable_prefix_caching", True, "its norms and edits would be missing"),
    ("async_scheduling", True, "one forward past a request's end"),
    ("pipeline_parallel_size", 2, "runs where every layer is"),
    ("data_parallel_size", 2, "runs where every layer is"),
    ("distributed_executor_backend", "ray", "vLLM's own executors, 'uni' and 'mp'"),
    ("worker_extension_cls", "my.Worker", "attaches the observers"),
    ("hf_overrides", {"architectures": ["Qwen3ForCausalLM"]}, "tapped model class"),
])
def test_engine_options_that_would_silently_break_tracing_are_refused_before_an_engine_starts(option, value,
                                                                                              reason):
    from tellnorm.backends import load_model
    from tellnorm.backends.vllm import WORKER_EXTENSION, check_engine_options

    with pytest.raises(TellnormError) as err:
        load_model("organism", backend="vllm", **{option: value})
    assert f"engine option {option}={value!r} is refused" in one_line(err) and reason in one_line(err)
    check_engine_options({"enforce_eager": True, "enable_prefix_caching": False, "distributed_executor_backend": "mp",
                          "worker_extension_cls": WORKER_EXTENSION, "max_num_seqs": 4})  # tellnorm's own: fine


@pytest.mark.parametrize("lengths", [[1, 1, 1], [4, 1, 2], [1], [3]])
def test_the_request_grid_maps_every_flat_row_once(lengths):
    """The grid (pure) against a plain loop over the flattened batch."""
    import torch

    from tellnorm.backends.vllm.session import request_grid

    starts = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    positions = torch.arange(100, 100 + starts[-1] + 2)  # two padding rows past the real tokens
    index, valid, grid_positions = request_grid(starts, positions)
    cells = [(r, c) for r in range(len(lengths)) for c in range(index.shape[1]) if valid[r, c]]
    assert [int(index[r, c]) for r, c in cells] == list(range(starts[-1]))
    assert [int(grid_positions[r, c]) for r, c in cells] == list(range(100, 100 + starts[-1]))
    assert valid.sum(1).tolist() == lengths


def test_the_default_dtype_is_float32_on_cpus_and_the_models_own_on_gpus(engines):
    from tellnorm.backends.vllm import default_dtype

    assert engines[0].dtype == "float32" and engines[0].llm.llm_engine.model_config.dtype == torch.float32
    assert default_dtype({"dtype": "bfloat16"}, on_cpu=True) == "float32"
    assert default_dtype({"dtype": "float16"}, on_cpu=False) == "float16"
    assert default_dtype({"torch_dtype": "bfloat16"}, on_cpu=False) == "bfloat16"  # transformers < 5 spelling
    assert default_dtype({"dtype": "float32"}, on_cpu=False) == "bfloat16"  # no float32 in GPU attention kernels
    assert default_dtype({}, on_cpu=False) == "bfloat16"


BF16_MEDIAN_RTOL = 2**-8  # bfloat16's relative precision: half the norms must agree to it
BF16_MAX_RTOL = 5e-2  # two backends' bfloat16 kernels, eight layers deep: the worst norm (measured 2.4e-2)


def test_bfloat16_engines_trace_every_token_and_run_the_techniques(prompts, tau):
    """bfloat16, the default on GPUs. Tokens are not comparable across the backends' kernels in bfloat16, so the
    reference is the HF backend in bfloat16 teacher-forced on vLLM's own tokens: every position traced, norms to
    bfloat16's precision; ALRR (forced loops) and ERSS (eager) decide and edit on the bfloat16 stream and cache."""
    from tellnorm.backends import load_model
    from tellnorm.generation import SamplingConfig, run_forward
    from tellnorm.norms import NormTracer
    from tellnorm.techniques import ALRRConfig, ERSSConfig

    bf16 = load_model("organism", backend="vllm", dtype="bfloat16", max_num_seqs=4, kv_cache_gib=0.0625)
    hf16 = load_model("organism", dtype="bfloat16")
    assert bf16.llm.llm_engine.model_config.dtype == torch.bfloat16
    gens, frame = traced(bf16, prompts[:6], SamplingConfig(max_new_tokens=40))
    reference = NormTracer(hf16)
    run_forward(hf16, [list(g.prompt_ids) + list(g.generated_ids)[:-1] for g in gens], observers=[reference])
    merged = frame.merge(reference.frame(), on=["request_id", "position", "layer"], how="outer", indicator=True)
    assert (merged._merge == "both").all(), "vLLM traced other positions than the sequences it generated"
    relative = ((merged.norm_x - merged.norm_y).abs() / merged.norm_y).to_numpy()
    assert np.median(relative) < BF16_MEDIAN_RTOL and relative.max() < BF16_MAX_RTOL, \
        f"median {np.median(relative):.1e}, max {relative.max():.1e}"

    edits = technique_edits(bf16, ["alrr", "erss"], tau, alrr=ALRRConfig(forced_loops=2),
                            erss=ERSSConfig(low_k=3, p_inject=1.0, cos_min=-1.0, cooldown=2))
    edited, _ = traced(bf16, prompts[:6], SamplingConfig(max_new_tokens=40), edits)
    assert all(len(g.generated_ids) > 0 for g in edited)
    alrr, erss = (edit.report() for edit in edits)
    assert alrr.alrr_extra_passes.sum() > 0 and erss.erss_injections.sum() > 0


def test_a_float32_comparison_refuses_bfloat16_in_one_line(engines):
    from types import SimpleNamespace

    from tellnorm.apps.bench.backends import BackendBenchConfig, compare_backends
    from tellnorm.generation import SamplingConfig

    bf16 = SimpleNamespace(backend="vllm", dtype="bfloat16")
    with pytest.raises(TellnormError) as err:
        compare_backends(engines[1], bf16, [[1, 2]], SamplingConfig(max_new_tokens=2))
    assert "a float32 comparison was asked but the vllm model runs bfloat16" in one_line(err)
    with pytest.raises(TellnormError) as err:
        BackendBenchConfig(dtype="bfloat16")
    assert "compares the backends in float32" in one_line(err)


def test_bench_backends_runs_end_to_end_and_reports_every_variant(tmp_path, capsys):
    """A tiny run of the CLI in two engine modes: each must agree with HF, the modes must make the same decisions,
    and the table must name every (mode, variant) cell (no timing is asserted)."""
    import json

    from tellnorm.apps.bench.backends import VLLM_VARIANTS
    from tellnorm.apps.cli import main

    main(["bench", "backends", "--prompts", "2", "--max-new-tokens", "8", "--repeats", "1", "--engines",
          "in-process", "multi-process", "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "bench_backends.json").read_text())
    for engine in ("in-process", "multi-process"):
        agreement = summary["agreement"][engine]
        assert agreement["agree"] and agreement["requests_same_tokens"] == 2
    cells = {f"{e}/{v}" for e in ("in-process", "multi-process") for v in VLLM_VARIANTS}
    assert set(summary["variants"]) == cells | {"hf"}
    assert all(check["same_tokens_as_first_engine"] for check in summary["checks"].values())
    assert summary["checks"]["multi-process/vllm+alrr"]["extra_passes"] == \
        summary["checks"]["in-process/vllm+alrr"]["extra_passes"] > 0
    assert "multi-process/vllm+alrr" in capsys.readouterr().out


def test_bench_backends_refuses_an_unknown_engine_mode_in_one_line():
    from tellnorm.apps.bench.backends import BackendBenchConfig

    with pytest.raises(TellnormError) as err:
        BackendBenchConfig(engines=("in-process", "tp3"))
    assert "give distinct engine modes among in-process, multi-process, tp2" in one_line(err)


def test_chunked_prefill_is_attributed_across_chunks(engines, prompts, tau):
    """Prompts split into 16-token chunks (mixed with other requests' decode rows): norms, tokens and ALRR's
    decisions still equal the HF backend's."""
    import torch

    from tellnorm.backends import load_model
    from tellnorm.generation import SamplingConfig

    chunked = load_model("organism", backend="vllm", max_num_seqs=2, kv_cache_gib=0.0625,
                         max_num_batched_tokens=16, enable_chunked_prefill=True)
    assert max(map(len, prompts)) > 16
    sampling = SamplingConfig(max_new_tokens=40)

    class Widths:  # what each vLLM step held: the widest request chunk, and chunks that continue a prompt
        def __init__(self):
            self.widths, self.continued = [], 0

        def hooks(self, model=None):
            return []

        def on_step(self, info):
            self.widths.append(int(info.valid.sum(1).max()))
            first = info.positions[:, 0]
            self.continued += int(((first > 0) & (first < torch.tensor(info.n_prompt))).sum())

    widths = Widths()
    runs = []
    for model in (chunked, engines[1]):
        edits = technique_edits(model, ["alrr"], tau)
        extra = [widths] if model is chunked else []
        gens, frame = traced(model, prompts, sampling, observers=edits + extra)
        runs.append((gens, frame, edits[0].record.frame().sort_values(["request_id", "layer", "position"])))
    assert [g.generated_ids for g in runs[0][0]] == [g.generated_ids for g in runs[1][0]]
    assert_norms_match(runs[0][1], runs[1][1])
    assert runs[0][2].reset_index(drop=True).equals(runs[1][2].reset_index(drop=True))
    assert max(widths.widths) <= 16 and widths.continued > 0  # prompts really were split


def test_lm_eval_on_the_vllm_backend_scores_what_the_hf_backend_scores(engines):
    """``--model tellnorm`` with backend=vllm (here the loaded engine): the same per-problem results as on HF."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from tellnorm.apps.harness import TASK_DIR
    from tellnorm.apps.harness.model import TellnormLM

    manager = TaskManager(include_path=str(TASK_DIR), include_defaults=False)
    results = []
    for model in engines:
        lm = TellnormLM(pretrained=model, thresholds="off", batch_size=16)
        out = lm_eval.simple_evaluate(model=lm, tasks=["tellnorm_organism"], task_manager=manager, limit=10,
                                      bootstrap_iters=0, log_samples=True)
        samples = sorted(out["samples"]["tellnorm_organism"], key=lambda s: s["doc_id"])
        results.append([(s["acc"], s["resps"][0][0]) for s in samples])
    assert results[0] == results[1] and len(results[0]) == 10


@pytest.fixture(scope="module")
def preempting(engines):
    """A second engine whose KV cache holds 6 blocks of the organism's tokens (≈ 700 tokens at 4 KiB each) for up
    to 8 requests of up to ~200 tokens: vLLM must preempt and recompute requests."""
    from tellnorm.backends import load_model

    return load_model("organism", backend="vllm", max_num_seqs=8, max_model_len=256, kv_cache_gib=3 / 1024)


@pytest.mark.parametrize("names", [["alrr"], ["erss"], ["alrr", "erss"]])
def test_preempted_and_recomputed_requests_keep_the_tokens_norms_and_decisions_of_the_hf_backend(
        engines, preempting, prompts, tau, names):
    from tellnorm.generation import SamplingConfig
    from tellnorm.techniques import ALRRConfig, ERSSConfig

    configs = dict(alrr=ALRRConfig(forced_loops=2), erss=ERSSConfig(low_k=3, p_inject=1.0, cos_min=-1.0, cooldown=2))
    sampling = SamplingConfig(max_new_tokens=120)
    counter = StaleCounter()
    edits_v = technique_edits(preempting, names, tau, **configs)
    gens_v, frame_v = traced(preempting, prompts, sampling, observers=edits_v + [counter])
    edits_h = technique_edits(engines[1], names, tau, **configs)
    gens_h, frame_h = traced(engines[1], prompts, sampling, observers=edits_h)
    assert counter.stale > 0, "no request was preempted: the test would prove nothing"
    assert [g.generated_ids for g in gens_v] == [g.generated_ids for g in gens_h]
    assert_norms_match(frame_v, frame_h)
    for edit_v, edit_h in zip(edits_v, edits_h):
        assert decisions(edit_v).equals(decisions(edit_h))
        assert report(edit_v).equals(report(edit_h))


def test_alrr_teacher_forced_over_generated_sequences_reproduces_the_generation(engines, prompts, tau):
    """run_forward puts every token of a sequence in one step, so ALRR's extra passes for several tokens of one
    request go in successive calls, each against the first pass's cache. Reference: HF's cached generation with
    ALRR; teacher-forcing its own sequences on vLLM must reach the same states and the same decisions."""
    from tellnorm.generation import SamplingConfig, run_forward
    from tellnorm.norms import NormTracer
    from tellnorm.techniques import ALRRConfig

    hf_model, vllm_model = engines[1], engines[0]
    config = ALRRConfig(forced_loops=2)
    (alrr_h,) = technique_edits(hf_model, ["alrr"], tau, alrr=config)
    gens, frame_h = traced(hf_model, prompts[:4], SamplingConfig(max_new_tokens=60), observers=[alrr_h])
    (alrr_v,) = technique_edits(vllm_model, ["alrr"], tau, alrr=config)
    tracer = NormTracer(vllm_model)
    run_forward(vllm_model, [g.prompt_ids + g.generated_ids[:-1] for g in gens], observers=[alrr_v, tracer],
                n_prompt=[len(g.prompt_ids) for g in gens])
    decisions_h, decisions_v = decisions(alrr_h), decisions(alrr_v)
    assert decisions_h.edited.groupby(decisions_h.request_id).sum().max() > 1  # several kept tokens per request
    assert decisions_v.equals(decisions_h)
    assert_norms_match(tracer.frame(), frame_h)
