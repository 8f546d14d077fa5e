"""tellnorm.backends.fastpath: raw HF decoder layers and the model's attention kernel under the bridge.

The fast path must measure exactly what the full bridge measures, switch to the bridge per block and per call when a
hook needs it, and leave the module tree, parameters and state dict as TransformerLens built them. The reference is
the full bridge forced by a no-op hook inside every block (the bridge as booted, on the same kernel), and an
independent HF model for the logits.
"""

from __future__ import annotations

import pytest
import torch

from tellnorm.backends import fastpath
from tellnorm.generation import SamplingConfig, generate
from tellnorm.norms import NormTracer

PROMPTS = [[3, 7, 9, 11, 4], [5, 6, 8], [12, 13, 14, 15, 16, 17, 18]]


class _Counter:
    """Counts calls of the bridge's own block forward (the path the fast path skips)."""

    def __init__(self, monkeypatch):
        from transformer_lens.model_bridge.generalized_components.block import BlockBridge

        self.calls = 0
        original = BlockBridge.forward

        def counted(block, *args, **kwargs):
            self.calls += 1
            return original(block, *args, **kwargs)

        monkeypatch.setattr(BlockBridge, "forward", counted)


def _bridge_everywhere(model):
    """No-op hooks inside every block (``attn.hook_z``): every block runs through the bridge."""
    return model.bridge.hooks(fwd_hooks=[(f"blocks.{L}.attn.hook_z", lambda z, hook: z)
                                         for L in range(model.n_layers)])


def _traced(model, sampling):
    tracer = NormTracer(model)
    gens = generate(model, PROMPTS, sampling, observers=[tracer], batch_size=3)
    return [g.generated_ids for g in gens], tracer.frame().sort_values(["request_id", "position", "layer"])


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_the_fast_path_measures_what_the_bridge_measures(arch, tiny_loaded_model, monkeypatch):
    model = tiny_loaded_model(arch)
    assert model.info["raw_layers"] == model.n_layers and model.info["attention"] == "sdpa"
    counter = _Counter(monkeypatch)
    sampling = SamplingConfig(max_new_tokens=8, temperature=0.8, seed=3)
    tokens, norms = _traced(model, sampling)
    assert counter.calls == 0  # only resid_post hooked: every block ran its raw HF layer
    with _bridge_everywhere(model):
        ref_tokens, ref_norms = _traced(model, sampling)
    assert counter.calls > 0
    assert tokens == ref_tokens
    assert norms["norm"].to_numpy() == pytest.approx(ref_norms["norm"].to_numpy(), rel=1e-6, abs=0)


def test_a_hook_inside_one_block_sends_that_block_and_that_call_through_the_bridge(tiny_loaded_model, monkeypatch):
    model = tiny_loaded_model("qwen3")
    counter = _Counter(monkeypatch)
    seen = []
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        plain = model.bridge(ids)
        with model.bridge.hooks(fwd_hooks=[("blocks.1.mlp.hook_out", lambda x, hook: seen.append(x.shape) or x)]):
            hooked = model.bridge(ids)
        assert counter.calls == 1 and seen == [torch.Size([1, len(PROMPTS[0]), model.d_model])]
        again = model.bridge(ids)
    assert counter.calls == 1  # the hook is gone: raw layers again
    assert torch.equal(plain, hooked) and torch.equal(plain, again)


def test_a_hook_that_raises_leaves_no_hook_and_the_fast_path_back(tiny_loaded_model, monkeypatch):
    model = tiny_loaded_model("qwen3")

    def boom(x, hook):
        raise RuntimeError("planted")

    with pytest.raises(RuntimeError, match="planted"), model.bridge.hooks(fwd_hooks=[("blocks.0.attn.hook_z", boom)]):
        model.bridge(torch.tensor([PROMPTS[0]]))
    counter = _Counter(monkeypatch)
    with torch.no_grad():
        model.bridge(torch.tensor([PROMPTS[0]]))
    assert counter.calls == 0


def test_raw_layers_share_the_parameters_and_stay_out_of_the_module_tree(tiny_loaded_model):
    model = tiny_loaded_model("qwen3")
    names = {name for name, _ in model.hf_model.named_modules()}
    assert not any("_tellnorm" in name for name in names)
    assert not any("_tellnorm" in key for key in model.hf_model.state_dict())
    for block in model.hf_model.model.layers:
        raw = block.__dict__["_tellnorm_raw"]
        assert {p.data_ptr() for p in raw.parameters()} == {p.data_ptr() for p in block.original_component.parameters()}
        assert not any(isinstance(m, fastpath.ModelKernelMixin) for m in raw.modules())


def test_stop_at_layer_still_stops(tiny_loaded_model, hf_reference):
    model = tiny_loaded_model("qwen3")
    ids = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        stopped = model.bridge(ids, stop_at_layer=2)
        ref = hf_reference("qwen3")(ids, output_hidden_states=True).hidden_states[2]
    assert (stopped - ref).abs().max().item() <= 1e-5


def test_pattern_hooks_get_the_eager_reimplementation_for_that_call_only(tiny_loaded_model):
    model = tiny_loaded_model("qwen3")
    ids = torch.tensor([PROMPTS[2]])
    patterns = {}
    fastpath._WARNED.discard("hook_pattern")
    with torch.no_grad():
        plain = model.bridge(ids)
        with pytest.warns(UserWarning, match="hook_pattern needs the bridge's eager attention"):
            logits, cache = model.bridge.run_with_cache(ids, names_filter=lambda n: n.endswith("attn.hook_pattern"))
        patterns = [cache[f"blocks.{L}.attn.hook_pattern"] for L in range(model.n_layers)]
    assert (logits - plain).abs().max().item() <= 1e-5
    for pattern in patterns:  # causal softmax rows: sum to one, nothing above the diagonal
        assert torch.allclose(pattern.sum(-1), torch.ones(()), atol=1e-5)
        assert pattern.triu(diagonal=1).abs().max().item() == 0


def test_use_bridge_layers_gives_back_the_bridge_as_booted(tiny_model_dir, monkeypatch):
    from tellnorm.backends import load_model

    model = load_model(tiny_model_dir("qwen3"))
    ids = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        fast = model.bridge(ids)
        fastpath.use_bridge_layers(model.hf_model)
        counter = _Counter(monkeypatch)
        booted = model.bridge(ids)
    assert counter.calls == model.n_layers
    assert (fast - booted).abs().max().item() <= 1e-5


def test_an_unknown_kernel_fails_in_one_line(tiny_model_dir, tiny_hf_pair):
    from tellnorm.backends import load_model
    from tellnorm.errors import TellnormError

    for spec in (tiny_model_dir("qwen3"), tiny_hf_pair("qwen3")):
        with pytest.raises(TellnormError, match="sdpaa") as err:
            load_model(spec, attn_implementation="sdpaa")
        assert "\n" not in str(err.value)
    with pytest.raises(TellnormError, match="backend='hf' only"):
        load_model("organism", backend="vllm", attn_implementation="sdpa")


def test_compatibility_mode_keeps_the_bridges_forward(tiny_model_dir, monkeypatch):
    """TransformerLens's compatibility mode folds weights into the bridge's modules: the raw HF layers would not see
    them, so every block and attention layer runs the bridge's own forward."""
    from tellnorm.backends import load_model

    model = load_model(tiny_model_dir("qwen3"))
    ids = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        before = model.bridge(ids)
        model.bridge.enable_compatibility_mode(disable_warnings=True)
        counter = _Counter(monkeypatch)
        after = model.bridge(ids)
    assert counter.calls == model.n_layers
    assert torch.equal(before.argmax(-1), after.argmax(-1))
    assert ((before - before.mean(-1, keepdim=True)) - (after - after.mean(-1, keepdim=True))).abs().max() <= 1e-4


# ------------------------------------------------------------------------ grouped-query attention without copies

class _Module:
    """What HF's attention integrations read from an attention module."""

    def __init__(self, groups):
        self.num_key_value_groups, self.is_causal = groups, True


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (8, 1), (6, 3)])
@pytest.mark.parametrize("q_len,kv_len,masked", [(1, 9, True), (1, 130, True), (7, 7, True), (7, 7, False),
                                                 (5, 40, True)])
def test_gqa_sdpa_returns_the_bits_of_hfs_sdpa(dtype, heads, kv_heads, q_len, kv_len, masked):
    """The copy-free kernel against HF's own sdpa integration (which copies the grouped key/value heads under a
    mask): the same bits, left padding and causal prefill included."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    gen = torch.Generator().manual_seed(heads * 100 + q_len * 10 + kv_len)
    batch, dim = 3, 32
    query = torch.randn(batch, heads, q_len, dim, generator=gen).to(dtype)
    key, value = (torch.randn(batch, kv_heads, kv_len, dim, generator=gen).to(dtype) for _ in range(2))
    mask = None
    if masked:  # causal, with the first row left-padded by 3
        mask = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len).expand(batch, 1, q_len, kv_len).clone()
        mask[0, :, :, :3] = False
    module = _Module(heads // kv_heads)
    ours, _ = fastpath.gqa_sdpa_attention(module, query, key, value, mask, scaling=dim ** -0.5)
    theirs, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=dim ** -0.5)
    assert ours.shape == (batch, q_len, heads, dim)
    assert torch.equal(ours, theirs)


def test_a_model_loaded_with_sdpa_runs_grouped_heads_without_copying_them(tiny_loaded_model, hf_reference,
                                                                          monkeypatch):
    """The tiny Qwen3 has 2 key/value heads for 4 query heads: tellnorm's load runs the copy-free kernel (no
    repeat_kv call), still reports sdpa, and a left-padded batch gives the HF reference's logits bit for bit."""
    from transformers.integrations import sdpa_attention

    model, ref = tiny_loaded_model("qwen3"), hf_reference("qwen3")
    assert model.info["attention"] == "sdpa" and model.hf_model.config._attn_implementation == fastpath.GQA_SDPA
    copies = []
    original = sdpa_attention.repeat_kv
    monkeypatch.setattr(sdpa_attention, "repeat_kv", lambda x, n: copies.append(n) or original(x, n))
    ids = torch.tensor([[0, 0] + PROMPTS[0], PROMPTS[2]])  # row 0 left-padded
    mask = torch.tensor([[0, 0] + [1] * 5, [1] * 7])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model.hf_model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        assert copies == []
        theirs = ref(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    assert copies  # HF's own sdpa copied the heads: the counter counts
    assert torch.equal(ours[mask.bool()], theirs[mask.bool()])
