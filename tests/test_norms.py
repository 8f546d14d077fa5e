"""Norm tracing against independent references: HF decoder-layer outputs in float64, batch vs alone, masks."""

import numpy as np
import pytest
import torch
from helpers import active_hook_count, hf_layer_norms_float64, organism_prompts, tiny_organism_like

from tellnorm.errors import TellnormError
from tellnorm.generation import SamplingConfig
from tellnorm.norms import NormTracer, layer_profile, trace_forward, trace_generation


@pytest.fixture(scope="module")
def model():
    return tiny_organism_like(n_layers=3)


def _hf_layer_outputs_float64(model, ids):
    return {i: norms[0].numpy() for i, norms in enumerate(hf_layer_norms_float64(model, [ids]))}


def test_forward_trace_matches_hf_decoder_layers_in_float64(model):
    seqs = organism_prompts(model, 3)
    trace = trace_forward(model, seqs)
    for rid, seq in enumerate(seqs):  # noqa: B007 (DataFrame.query reads rid as @rid)
        ref = _hf_layer_outputs_float64(model, seq)
        for layer in range(model.n_layers):
            ours = trace.frame.query("request_id == @rid and layer == @layer").sort_values("position")["norm"]
            np.testing.assert_allclose(ours.to_numpy(), ref[layer], rtol=1e-5)


def test_last_layer_is_raw_block_output_not_final_normed_hidden_state(model):
    seq = organism_prompts(model, 1)[0]
    trace = trace_forward(model, [seq])
    last = model.n_layers - 1  # noqa: F841 (DataFrame.query reads it as @last)
    ours = trace.frame.query("layer == @last").sort_values("position")["norm"].to_numpy()
    with torch.no_grad():
        final_normed = model.hf_model(torch.tensor([seq]), output_hidden_states=True).hidden_states[-1][0]
    assert not np.allclose(ours, final_normed.double().norm(dim=-1).numpy(), rtol=1e-2)


def test_generation_trace_is_the_same_alone_and_in_a_batch_of_eight(model):
    prompts = organism_prompts(model, 8, seed=4)
    cfg = SamplingConfig.paper(max_new_tokens=8, seed=3)
    ids = [f"q{i}" for i in range(8)]
    batch = trace_generation(model, prompts, cfg, request_ids=ids, batch_size=8)
    for i in (0, 3, 7):
        alone = trace_generation(model, [prompts[i]], cfg, request_ids=[ids[i]])
        a = batch.frame[batch.frame.request_id == ids[i]].reset_index(drop=True)
        b = alone.frame.reset_index(drop=True)
        assert list(a.token) == list(b.token) and list(a.position) == list(b.position)
        np.testing.assert_allclose(a.norm.to_numpy(), b.norm.to_numpy(), atol=1e-5, rtol=0)
        assert batch.generations[i].text == alone.generations[0].text


def test_generated_norms_match_a_teacher_forced_reference(model):
    """Decode-time norms (KV cache, one token per step) equal a single full forward over the final sequence."""
    prompts = organism_prompts(model, 2, seed=5)
    gen = trace_generation(model, prompts, SamplingConfig(max_new_tokens=6), request_ids=["a", "b"])
    for g in gen.generations:
        ref = _hf_layer_outputs_float64(model, g.ids[:-1])  # the last token was never fed back
        ours = gen.frame.query("request_id == @g.request_id and layer == 2").sort_values("position")["norm"]
        np.testing.assert_allclose(ours.to_numpy(), ref[2], rtol=1e-4)


def test_folded_records_give_the_same_frame_as_raw_ones(model, monkeypatch):
    """Long traces fold their per-pass records into table chunks (tellnorm.norms.COMPACT_AFTER): same rows, same
    order, same dtypes, and still the teacher-forced reference's norms."""
    import tellnorm.norms as norms_module

    prompts = organism_prompts(model, 3, seed=6)
    cfg = SamplingConfig(max_new_tokens=12)
    raw = trace_generation(model, prompts, cfg, request_ids=["a", ("b", 1), "c"]).frame
    monkeypatch.setattr(norms_module, "COMPACT_AFTER", 5)  # 3 layers: a chunk every second pass, one left raw
    folded = trace_generation(model, prompts, cfg, request_ids=["a", ("b", 1), "c"])
    assert len(folded.frame) == len(raw)
    for column in raw.columns:
        assert folded.frame[column].dtype == raw[column].dtype, column
        assert folded.frame[column].tolist() == raw[column].tolist(), column
    g = folded.generations[1]
    ours = folded.frame[(folded.frame.request_id == ("b", 1)) & (folded.frame.layer == 1)].sort_values("position")
    np.testing.assert_allclose(ours.norm.to_numpy(), _hf_layer_outputs_float64(model, g.ids[:-1])[1], rtol=1e-4)


def test_masks_and_columns(model):
    prompts = organism_prompts(model, 2, seed=6)
    trace = trace_generation(model, prompts, SamplingConfig(max_new_tokens=5))
    f = trace.frame
    for rid, g in enumerate(trace.generations):
        rows = f[(f.request_id == rid) & (f.layer == 0)].sort_values("position")
        assert rows.is_prompt.sum() == len(g.prompt_ids)
        assert rows.is_generated.sum() == len(g.generated_ids) - 1  # final token never fed through the model
        assert list(rows.token[: len(g.prompt_ids)]) == model.token_strings(g.prompt_ids)
        assert rows.is_position_zero.sum() == 1 and rows.iloc[0].position == 0
    stats = trace.statistics_rows()
    assert not stats.is_position_zero.any() and stats.is_generated.all()
    assert len(trace.statistics_rows(include_position_zero=True, generated_only=False)) == len(f)


def test_in_think_mask_marks_tokens_strictly_inside_the_think_block():
    from tellnorm.generation import Generation
    from tellnorm.norms import token_table

    model = tiny_organism_like(n_layers=1)
    ids = model.tokenizer("<|im_start|>assistant\n<think>\na = 5 .\n</think>\n\nanswer : 5",
                          add_special_tokens=False)["input_ids"]
    table = token_table(model, [Generation(0, ids[:3], ids[3:], "eos")])
    inside = table[table.in_think].token.tolist()
    assert inside == ["\n", "a", "=", "5", ".", "\n"]


def test_massive_activation_at_position_zero_is_excluded_by_default(model):
    """Inject a 1000x activation at position 0 of layer 1 and check statistics ignore it by default."""
    prompts = organism_prompts(model, 2, seed=7)

    def massive(x, hook):
        if x.shape[1] == 1:  # decode step: position 0 is not in this forward pass
            return x
        x = x.clone()
        x[:, 0] *= 1000.0  # batch_size=1 below, so column 0 is position 0 (no left padding)
        return x

    with model.bridge.hooks(fwd_hooks=[(model.hook_name(1), massive)]):
        trace = trace_generation(model, prompts, SamplingConfig(max_new_tokens=4), layers=[1, 2], batch_size=1)
    assert active_hook_count(model) == 0
    f = trace.frame
    pos0 = f[(f.position == 0) & (f.layer == 1)].norm
    rest = f[(f.position > 0) & (f.layer == 1)].norm
    assert pos0.min() > 100 * rest.median()
    prof = layer_profile(trace.statistics_rows(generated_only=False), by=[])
    prof_with = layer_profile(trace.statistics_rows(generated_only=False, include_position_zero=True), by=[])
    assert prof_with.set_index("layer").mean_norm[1] > 5 * prof.set_index("layer").mean_norm[1]


def test_non_finite_activation_names_layer_and_position_and_removes_hooks(model):
    def poison(x, hook):
        x = x.clone()
        x[:, -1, 0] = float("nan")
        return x

    prompts = organism_prompts(model, 1)
    with (pytest.raises(TellnormError, match=r"non-finite activation at layer 2 .*position"),
          model.bridge.hooks(fwd_hooks=[(model.hook_name(2, "resid_post"), poison)])):
        trace_generation(model, prompts, SamplingConfig(max_new_tokens=3), layers=[2])
    assert active_hook_count(model) == 0


def test_tracer_as_context_manager_on_any_forward_and_other_hook_points(model):
    seq = organism_prompts(model, 1)[0]
    with NormTracer(model, layers=[0], point="mlp_out") as tracer, torch.no_grad():
        model.bridge(torch.tensor([seq]))
    assert active_hook_count(model) == 0
    got = tracer.frame().sort_values("position")["norm"].to_numpy()
    captured = {}
    handle = model.hf_model.model.layers[0].mlp.register_forward_hook(lambda m, i, o: captured.setdefault("mlp", o))
    try:
        with torch.no_grad():
            model.hf_model(torch.tensor([seq]))
    finally:
        handle.remove()
    np.testing.assert_allclose(got, captured["mlp"][0].double().norm(dim=-1).numpy(), rtol=1e-5)


def test_bad_hook_point_or_layer_is_one_clear_error(model):
    with pytest.raises(TellnormError, match="unknown hook point"):
        NormTracer(model, point="resid_everywhere")
    with pytest.raises(TellnormError, match="out of range"):
        NormTracer(model, layers=[model.n_layers])
