"""Hybrid reasoning models — Qwen3.5 dense and MoE, Qwen3-Next, OLMo Hybrid — on tiny random models (3 Gated DeltaNet
linear-attention layers and one full-attention layer, built by ``test_architectures.build``), each against an
independent reference:

* generation runs on transformers' own hybrid cache: the KV-cached run equals the cache-free reference (tokens, every
  layer's norms 1e-4), with a request that leaves the batch mid-run (its state rows dropped) and one alone;
* the hook points add up (``resid_pre + attn_out = resid_mid``, ``resid_mid + mlp_out = resid_post``) on both kinds of
  layer, the linear-attention ones included, where the bridge names the mixer differently;
* an edit of a linear-attention layer's input moves its recurrent and convolution states exactly as an unhooked HF
  copy, fed the edited residual by a plain torch pre-hook, computes them;
* ALRR at linear-attention and full-attention layers: the cached run equals the cache-free reference (tokens,
  decisions, norms); its extra pass against a hooked forward of the truncated sequence is in test_architectures;
* Qwen3.5's multimodal checkpoints load as their text model.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from test_architectures import PROMPT, TOL, build, max_diff, tiny, tokenizer_for  # noqa: F401 (a fixture)
from test_techniques import assert_same_norms, clean_norms, generated_norms, tau_between

from tellnorm.backends import load_model
from tellnorm.backends.hf import state_layers
from tellnorm.errors import TellnormError
from tellnorm.generation import LayerHooks, SamplingConfig, generate
from tellnorm.interventions.edits import AddVector
from tellnorm.norms import NormTracer
from tellnorm.techniques import ALRR, ALRRConfig, threshold_for

HYBRIDS = ("Qwen3_5ForCausalLM", "Qwen3_5MoeForCausalLM", "Qwen3NextForCausalLM", "OlmoHybridForCausalLM")
LINEAR, FULL = 1, 3  # the tiny models' layer types: linear, linear, linear, full attention
# (rtol, atol) of norms: the 1e-4. The cached run's linear-attention layers step their recurrence token by
# token while the cache-free reference runs HF's chunked form over the whole sequence, which rounds differently
NORMS = (1e-4, 1e-4)


def greedy(n_new: int) -> SamplingConfig:
    """Greedy, never stopping at EOS: every request runs to ``n_new`` tokens or the end of the context."""
    return SamplingConfig(max_new_tokens=n_new, ignore_eos=True)


@pytest.fixture(scope="module")
def hybrid(tiny):  # noqa: F811 (the imported fixture)
    """``arch -> LoadedModel`` of test_architectures' tiny model (built once per module)."""
    def make(arch: str):
        model = tiny(arch)[0]
        assert state_layers(model.hf_model.config) == [0, 1, 2]
        return model

    return make


def prompts_for(model, n_new: int) -> list[list[int]]:
    """Three prompts of different lengths (left padding) and one that fills the context after ``n_new // 2`` tokens,
    so its row leaves the batch mid-run."""
    prompts = [model.encode(p) for p in (PROMPT, "w10 w11 w12", "w13 w14 w15 w16 w17 w18")]
    return prompts + [(prompts[0] * model.max_positions)[: model.max_positions - n_new // 2]]


@pytest.mark.parametrize("arch", HYBRIDS)
def test_cached_generation_equals_the_cache_free_reference(arch, hybrid):
    model = hybrid(arch)
    n_new = 10
    prompts = prompts_for(model, n_new)
    runs = {}
    for reuse in (True, False):
        tracer = NormTracer(model)
        gens = generate(model, prompts, greedy(n_new), observers=[tracer], reuse_cache=reuse)
        runs[reuse] = ([g.generated_ids for g in gens], tracer.frame())
    assert len(runs[True][0][-1]) == n_new // 2 < len(runs[True][0][0])  # the long request left the batch early
    assert runs[True][0] == runs[False][0]
    assert_same_norms(runs[True][1], runs[False][1], *NORMS)
    alone = [generate(model, [p], greedy(n_new))[0].generated_ids for p in prompts]
    assert alone == runs[True][0]


@pytest.mark.parametrize("arch", HYBRIDS)
def test_hook_points_add_up_on_both_kinds_of_layer(arch, hybrid):
    model = hybrid(arch)
    ids = torch.tensor([model.encode(PROMPT)])
    names = {(L, p): model.hook_name(L, p) for L in range(model.n_layers)
             for p in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")}
    with torch.no_grad():
        _, cache = model.bridge.run_with_cache(ids, names_filter=lambda n: n in set(names.values()))
    for L in range(model.n_layers):
        at = {p: cache[names[L, p]] for p in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")}
        if arch == "OlmoHybridForCausalLM" and L not in state_layers(model.hf_model.config):
            continue  # its attention layers norm each sublayer's output (as OLMo 2 does): attn_out is before the norm
        assert max_diff(at["resid_pre"] + at["attn_out"], at["resid_mid"]) <= TOL, (arch, L)
        assert max_diff(at["resid_mid"] + at["mlp_out"], at["resid_post"]) <= TOL, (arch, L)
        assert at["attn_out"].norm() > 1e-3  # the mixer really wrote


class StateAfterPrefill(LayerHooks):
    """Copies of layer ``layer``'s convolution and recurrent states as the first decode step starts."""

    def __init__(self, model, layer: int):
        super().__init__(model, [layer])
        self.states = None

    def on_step(self, info):
        if info.step == 1:
            cached = info.cache.layers[self.layers[0]]
            self.states = (cached.conv_states[0].clone(), cached.recurrent_states[0].clone())

    def hooks(self, model=None):
        return []


def steering(model) -> torch.Tensor:
    """A fixed vector about as long as the residual (a scale edit would vanish in the layer's input norm)."""
    return torch.randn(model.d_model, generator=torch.Generator().manual_seed(0)) * 3.0


def reference_states(arch: str, ids: list[int], vector: torch.Tensor | None):
    """An unhooked HF copy's layer-LINEAR states after the prompt, ``vector`` added to that layer's input by a torch
    pre-hook (None: unedited)."""
    from transformers import DynamicCache

    ref = build(arch)

    def add(module, args, kwargs):
        return (args[0] + vector, *args[1:]), kwargs

    handle = ref.model.layers[LINEAR].register_forward_pre_hook(add, with_kwargs=True) if vector is not None else None
    try:
        cache = DynamicCache(config=ref.config)
        with torch.no_grad():
            ref(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True)
    finally:
        if handle is not None:
            handle.remove()
    return cache.layers[LINEAR].conv_states[0], cache.layers[LINEAR].recurrent_states[0]


@pytest.mark.parametrize("arch", HYBRIDS)
def test_an_edit_of_a_linear_attention_layer_moves_its_state_as_the_edited_residual_would(arch, hybrid):
    model = hybrid(arch)
    ids = model.encode(PROMPT)
    probe = StateAfterPrefill(model, LINEAR)
    edit = AddVector(model, [LINEAR], steering(model), point="resid_pre")
    generate(model, [ids], SamplingConfig(max_new_tokens=3), observers=[edit, probe])
    conv, recurrent = probe.states
    ref_conv, ref_recurrent = reference_states(arch, ids, steering(model))
    assert max_diff(conv, ref_conv) <= TOL * ref_conv.abs().max()
    assert max_diff(recurrent, ref_recurrent) <= TOL * ref_recurrent.abs().max()
    clean_recurrent = reference_states(arch, ids, None)[1]
    assert max_diff(recurrent, clean_recurrent) > 1e-2 * clean_recurrent.abs().max()  # the edit moved it

    # and the edited run's cached generation equals its cache-free reference
    prompts = prompts_for(model, 8)
    runs = {}
    for reuse in (True, False):
        tracer = NormTracer(model)
        edit = AddVector(model, [LINEAR], steering(model), point="resid_pre")
        gens = generate(model, prompts, greedy(8), observers=[edit, tracer], reuse_cache=reuse)
        runs[reuse] = ([g.generated_ids for g in gens], tracer.frame())
    assert runs[True][0] == runs[False][0]
    assert_same_norms(runs[True][1], runs[False][1], *NORMS)


@pytest.mark.parametrize("arch", HYBRIDS)
@pytest.mark.parametrize("layers", [(LINEAR,), (LINEAR, FULL)], ids=["linear", "linear+full"])
def test_alrr_cached_equals_the_cache_free_reference(arch, layers, hybrid):
    model = hybrid(arch)
    n_new = 10
    prompts = prompts_for(model, n_new)
    traced = list(range(LINEAR, model.n_layers))
    _, clean = clean_norms(model, prompts, traced, n_new)
    taus = {layer: tau_between(generated_norms(clean, prompts, layer), 0.3) for layer in layers}
    runs = {}
    for reuse in (True, False):
        alrr = ALRR(model, threshold_for("fixed", fixed=taus),
                    ALRRConfig(layers=layers, growth_eps=0.0, blowup_ratio=3.0, max_extra_iters=2))
        tracer = NormTracer(model, traced)
        gens = generate(model, prompts, greedy(n_new), observers=[alrr, tracer],
                        reuse_cache=reuse)
        runs[reuse] = ([g.generated_ids for g in gens], alrr.report(), tracer.frame())
    (tokens, report, frame), (ref_tokens, ref_report, ref_frame) = runs[True], runs[False]
    kept = report.groupby("layer").alrr_kept_passes.sum()
    assert all(kept.get(layer, 0) > 0 for layer in layers), kept  # every layer really re-ran blocks
    assert tokens == ref_tokens
    pd.testing.assert_frame_equal(report, ref_report)
    assert_same_norms(frame, ref_frame, *NORMS)
    clean_next = clean[clean.layer == LINEAR + 1].set_index(["request_id", "position"]).norm
    ours_next = frame[frame.layer == LINEAR + 1].set_index(["request_id", "position"]).norm
    common = clean_next.index.intersection(ours_next.index)
    assert np.abs(ours_next[common].to_numpy() - clean_next[common].to_numpy()).max() > 1e-2  # the edit is real


def test_qwen3_5_multimodal_checkpoint_loads_as_its_text_model(tmp_path):
    import transformers

    text = build("Qwen3_5ForCausalLM").config.to_dict()
    config = transformers.Qwen3_5Config(text_config=text, vision_config=dict(
        depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=text["hidden_size"]))
    config.architectures = ["Qwen3_5ForConditionalGeneration"]
    torch.manual_seed(0)
    multimodal = transformers.Qwen3_5ForConditionalGeneration(config).eval()
    multimodal.save_pretrained(tmp_path)
    tokenizer_for("Qwen3_5ForCausalLM").save_pretrained(tmp_path)
    model = load_model(tmp_path)
    assert model.info["hf_architecture"] == "Qwen3_5ForCausalLM" and model.architecture == "qwen3_5"
    # (from a qwen3_5 folder transformers rebuilds the tokenizer as Qwen3.5's own BPE, which the tiny word-level
    # vocabulary does not survive: the ids come from the tiny tokenizer itself)
    ids = torch.tensor([tokenizer_for("Qwen3_5ForCausalLM")(PROMPT, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logits = model.bridge(ids)
        expected = multimodal(input_ids=ids).logits
    assert max_diff(logits, expected) <= TOL
    with pytest.raises(TellnormError, match="load its text model with transformers.AutoModelForCausalLM"):
        load_model((multimodal, tokenizer_for("Qwen3_5ForCausalLM")))
